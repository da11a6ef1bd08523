"""MLflow logging: one run per training, metrics per step, the adapter as an artifact.

The tracking store is MLflow's own default (MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the
working directory) unless `tracking.tracking_uri` names one. Credentials stay in the environment.
"""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

from .params import Params, TrackingParams

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class Tracker:
    """A thin wrapper so training code reads `tracker.log_metric(...)` whether MLflow is on or off."""

    def __init__(self, run=None):
        self.run = run

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_metric(self, key: str, value: float, step: int | None = None):
        if self.run:
            import mlflow

            mlflow.log_metric(key, value, step=step)

    def log_metrics(self, metrics: dict, step: int | None = None):
        if self.run:
            import mlflow

            mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None):
        if self.run:
            import mlflow

            mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        if self.run:
            import mlflow

            mlflow.log_artifact(str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict):
        if self.run:
            import mlflow

            mlflow.set_tags({k: str(v) for k, v in tags.items() if v is not None})


@contextmanager
def start_run(tracking: TrackingParams, run_name: str | None = None, params: Params | None = None,
              run_id: str | None = None):
    """Start (or, with run_id, resume) an MLflow run; yields a Tracker (a no-op one when disabled)."""
    if not tracking.enabled or os.environ.get("RANK", "0") != "0":  # data parallel: rank 0 alone logs
        yield Tracker(None)
        return
    import mlflow

    if tracking.tracking_uri:
        mlflow.set_tracking_uri(tracking.tracking_uri)
    if run_id is None:
        mlflow.set_experiment(tracking.experiment)
    with mlflow.start_run(run_name=run_name, run_id=run_id) as run:
        tracker = Tracker(run)
        if params is not None and run_id is None:
            mlflow.log_params(flatten(params.model_dump()))
            commit = git_commit()
            tracker.set_tags({"mlflow.source.git.commit": commit, "git_commit": commit})
        yield tracker
