"""The DVC pipeline in a scratch copy of the repository: precise deps, no-op repro, experiments."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT


def run(cmd, cwd, env):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def ran(output):
    return re.findall(r"Running stage '([^']+)'", output)


def set_param(repo, key, value):
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    section, name = key.split(".")
    raw[section][name] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory, models_cache):
    repo = tmp_path_factory.mktemp("repo")
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split()  # committed or not: the working tree
    files += [str(p.relative_to(ROOT)) for p in (ROOT / "data" / "samples").rglob("*") if p.is_file()]
    for f in set(files):
        if f.startswith(("tests/", "dvc.lock", "metrics/")) or not (ROOT / f).is_file():
            continue
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["model"]["cache_dir"] = str(models_cache)
    raw["train"]["max_steps"] = 2
    raw["evaluate"]["max_new_tokens"] = 4
    raw["pdf2img"]["dpi"] = 40
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
    (repo / ".gitignore").write_text((ROOT / ".gitignore").read_text() + "/mlflow.db\n")
    run(["git", "init", "-q"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_repro_then_noop_then_only_downstream(repo):
    repo, env = repo
    out = run(["dvc", "repro"], repo, env)
    assert ran(out) == ["pdf2img", "teacher_label", "build_dataset", "train", "evaluate"]
    for f in ("metrics/teacher.json", "metrics/train.json", "metrics/eval.json", "metrics/eval_per_doc.json",
              "metrics/train_loss.csv", "models/adapter/adapter_model.safetensors", "data/dataset/train.jsonl"):
        assert (repo / f).is_file(), f

    assert ran(run(["dvc", "repro"], repo, env)) == []  # nothing changed: nothing runs

    set_param(repo, "evaluate.max_new_tokens", 5)
    assert ran(run(["dvc", "repro"], repo, env)) == ["evaluate"]

    # a training param reruns train and evaluate: test_experiments_per_lora_mode (lora.mode)

    set_param(repo, "teacher.min_chars", 2)
    assert ran(run(["dvc", "repro"], repo, env))[0] == "teacher_label"  # downstream stages only if labels changed

    metrics = json.loads(run(["dvc", "metrics", "show", "--json"], repo, env))
    assert metrics  # dvc reads every declared metrics file
    plots = run(["dvc", "plots", "show", "--json"], repo, env)
    assert "eval_per_doc.json" in plots and "train_loss.csv" in plots
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "baseline"], repo, env)


def test_experiments_per_lora_mode(repo):
    repo, env = repo
    out = run(["dvc", "exp", "run", "-S", "lora.mode=both"], repo, env)  # one experiment: the suite's time
    assert ran(out) == ["train", "evaluate"]
    table = json.loads(run(["dvc", "exp", "show", "--json"], repo, env))
    counts = {}
    for commit in table:
        for exp in [commit] + [e for ex in commit.get("experiments") or [] for e in ex.get("revs", [])]:
            data = exp.get("data") or {}
            mode = (data.get("params", {}).get("params.yaml", {}).get("data", {}).get("lora", {}) or {}).get("mode")
            trainable = (data.get("metrics", {}).get("metrics/train.json", {}).get("data", {}) or {}).get(
                "trainable_params")
            if exp.get("name") and mode:
                counts[mode] = trainable
    # the workspace's own row (mode llm) and the experiment's: each with its own count of LoRA weights (r 64)
    assert counts.get("llm") == 120_832 and counts.get("both") == 268_288, counts
    # the experiment's MLflow run carries its DVC name
    import mlflow

    names = {e.get("name") for c in table for ex in c.get("experiments") or [] for e in ex.get("revs", [])} - {None}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ocr-finetune").experiment_id])
    assert any(r.info.run_name in names and r.data.tags.get("dvc_experiment") == r.info.run_name for r in runs), (
        names, [r.info.run_name for r in runs])


def test_teacher_label_with_an_api_teacher(repo):
    """`dvc repro` labels the pages through an OpenAI-compatible server (a real one on 127.0.0.1)."""
    from openai_server import ScriptedOpenAI

    repo, env = repo
    with ScriptedOpenAI() as server:
        raw = yaml.safe_load((repo / "params.yaml").read_text())
        raw["teacher"].update(kind="api")
        raw["teacher"]["api"].update(base_url=server.base_url, api_key_env="TEST_OCR_KEY", concurrent_requests=4)
        (repo / "params.yaml").write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))
        out = run(["dvc", "repro", "teacher_label"], repo, {**env, "TEST_OCR_KEY": "sk-" + "q" * 16})
        assert "teacher_label" in ran(out)
        assert sum(server.requests.values()) == 8  # every rendered page once, the scan included
    labels = [json.loads(line) for line in (repo / "data" / "labels" / "labels.jsonl").read_text().splitlines()]
    assert len(labels) == 8 and {x["teacher"] for x in labels} == {"api"}
    assert all(x["status"] == "labeled" and x["text"].startswith("# Page") for x in labels)
    metrics = json.loads((repo / "metrics" / "teacher.json").read_text())
    assert metrics["requests"]["requests"] == 8 and metrics["requests"]["failed"] == 0
    assert "sk-qqqq" not in (repo / "metrics" / "teacher.json").read_text() + (repo / "dvc.lock").read_text()


def test_plots_render_offline(repo, tmp_path):
    """`dvc plots show` uses dvc_plots/offline.html (vega inlined): no CDN, and a browser draws the charts."""
    import shutil

    from PIL import Image, ImageStat

    repo, env = repo
    run(["dvc", "plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vega-embed@6.18.2" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("needs Debian chromium (`make browser`) to check the drawing")
    png = tmp_path / "plots.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                    "--window-size=1200,1400", "--virtual-time-budget=5000", f"file://{tmp_path / 'plots' / 'index.html'}"],
                   check=True, capture_output=True, timeout=120)
    with Image.open(png) as im:
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 20  # axes, bars and lines, not an empty page


def test_interrupted_repro_resumes_training(repo):
    """`dvc repro` killed in the middle of training: the next `dvc repro` continues from the last checkpoint
    (train.resume: auto) instead of starting again."""
    import signal
    import time

    repo, env = repo
    set_param(repo, "train.max_steps", 12)
    set_param(repo, "train.save_every", 2)
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not list((repo / "models" / "checkpoints").glob("*/state.pt")) and time.time() < deadline:
        assert proc.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the training process under it, as a crash or power cut would
    proc.wait()
    out = run(["dvc", "repro", "train"], repo, env)
    assert ran(out) == ["train"]
    step = re.search(r"resuming from step (\d+) of 12", out)
    assert step and int(step.group(1)) >= 2, out[-2000:]
    assert json.loads((repo / "metrics" / "train.json").read_text())["steps"] == 12
    assert len((repo / "metrics" / "train_loss.csv").read_text().splitlines()) == 1 + 12  # earlier steps kept
    assert not list((repo / "models" / "checkpoints").glob("*/*"))  # a finished run deletes its checkpoint
