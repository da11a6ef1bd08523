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
# MLflow retries an unreachable server 7 times with doubling waits (about 4 minutes of silence); 3 is enough
# to ride out a blip and says what is wrong within seconds
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")


class TrackingError(ValueError):
    """The tracking store cannot be used (unreachable, refused): one line, and how to go on without it."""


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
    """A thin wrapper so training code reads `tracker.log_metric(...)` whether MLflow is on or off. Logging is
    best effort once the run has started: a tracking server that goes away mid-run costs its metrics (with
    one warning), not the training."""

    def __init__(self, run=None):
        self.run = run
        self.failed = False

    def _safely(self, name: str, *args, **kwargs):
        """mlflow.<name>(...) while the run is on; mlflow is not imported at all with tracking off."""
        if not self.run or self.failed:
            return
        import mlflow

        try:
            getattr(mlflow, name)(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow raises its own, requests' and OS errors alike
            self.failed = True
            print(f"warning: MLflow logging stopped ({type(e).__name__}: {str(e)[:200]}); the run goes on, "
                  "its metrics are still written under metrics/", flush=True)

    @property
    def run_id(self) -> str | None:
        return self.run.info.run_id if self.run else None

    def log_metric(self, key: str, value: float, step: int | None = None):
        self._safely("log_metric", key, value, step=step)

    def log_metrics(self, metrics: dict, step: int | None = None):
        self._safely("log_metrics", {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None):
        self._safely("log_artifacts", str(path), artifact_path=artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None):
        self._safely("log_artifact", str(path), artifact_path=artifact_path)

    def set_tags(self, tags: dict):
        self._safely("set_tags", {k: str(v) for k, v in tags.items() if v is not None})


def why_run_unavailable(tracking: TrackingParams, run_id: str) -> str | None:
    """None if the store holds this run, else why not (an adapter trained on another machine, or before
    mlflow.db was deleted, names a run that is not here; or the store cannot be reached)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking.tracking_uri:
        mlflow.set_tracking_uri(tracking.tracking_uri)
    try:
        mlflow.get_run(run_id)
        return None
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return "is not in this tracking store (trained elsewhere, or the store was replaced)"
        return f"cannot be read from the tracking store ({str(e)[:200]})"
    except Exception as e:  # noqa: BLE001 - no store to ask (connection, OS errors)
        return f"cannot be read from the tracking store ({type(e).__name__}: {str(e)[:200]})"


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
    try:
        if run_id is None:
            mlflow.set_experiment(tracking.experiment)
        run = mlflow.start_run(run_name=run_name, run_id=run_id)
    except Exception as e:  # noqa: BLE001 - unreachable server, refused credentials, a store it cannot open
        where = tracking.tracking_uri or "its default store (MLFLOW_TRACKING_URI or sqlite:///mlflow.db)"
        raise TrackingError(f"tracking: MLflow at {where} cannot start a run "
                            f"({type(e).__name__}: {str(e)[:300]}). Fix tracking.tracking_uri or set "
                            "tracking.enabled=false to go on without MLflow") from None
    tracker, status = Tracker(run), "FINISHED"
    try:
        if params is not None and run_id is None:
            mlflow.log_params(flatten(params.model_dump()))
            commit = git_commit()
            tracker.set_tags({"mlflow.source.git.commit": commit, "git_commit": commit})
        yield tracker
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        try:  # a server lost mid-run must not fail a training that has finished (and cleared its checkpoints)
            mlflow.end_run(status)
        except Exception as e:  # noqa: BLE001
            print(f"warning: MLflow could not close run {run.info.run_id} ({type(e).__name__}: {str(e)[:200]})",
                  flush=True)
