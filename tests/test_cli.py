"""The CLI end to end on the tiny model, and MLflow logging of a training run."""

import json
import shutil
import os
import subprocess
import sys

import yaml

from conftest import ROOT

SAMPLES = ROOT / "data" / "samples" / "pdfs"


SECRET = "hf_" + "x" * 12 + "notreal"


def cli(*args, cwd=None, env=None):
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd, capture_output=True,
                       text=True, env=env, timeout=600)  # a hang fails the test instead of stalling CI
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def small_params(tmp_path, models_cache, **overrides):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["cache_dir"] = str(models_cache)
    raw["train"].update(max_steps=3, output_dir=str(tmp_path / "adapter"))
    raw["evaluate"]["max_new_tokens"] = 8
    raw["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    raw["teacher"]["cache_dir"] = str(tmp_path / "teacher_cache")
    for section, values in overrides.items():
        raw[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def test_console_script_and_main_py_agree():
    exe = ROOT / ".venv" / "bin" / "ocr-finetune"
    direct = subprocess.run([sys.executable, str(ROOT / "main.py"), "--help"], capture_output=True, text=True)
    assert all(c in direct.stdout for c in ("pdf2img", "infer", "train", "evaluate", "inspect"))
    if exe.exists():
        via_script = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
        assert via_script.stdout == direct.stdout.replace("main.py", "ocr-finetune")


def test_pdf2img_train_evaluate_infer_and_mlflow(tmp_path, models_cache, tiny_dir):
    # the base as a Hugging Face cache snapshot: its repo and revision are recorded with the adapter and in MLflow
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--acme--ocr-tiny" / "snapshots" / revision
    shutil.copytree(tiny_dir, snapshot)
    params = small_params(tmp_path, models_cache, model={"base": str(snapshot)})
    out = cli("pdf2img", "--pdf", SAMPLES, "--output", tmp_path / "pages", "--dpi", 40)
    assert "rendered" in out and (tmp_path / "pages" / "korean_memo_p1.png").is_file()

    from ocr_finetune.dataset import build_dataset
    from ocr_finetune.teachers import get_teacher, label_pages
    from ocr_finetune.params import Params

    labels = label_pages(get_teacher(Params()), tmp_path / "pages", SAMPLES, tmp_path / "labels",
                         progress=False)
    build_dataset(labels, tmp_path / "pages", tmp_path / "ds", "<image>\nFree OCR.", 0.34, 0)

    env = {**os.environ, "HF_TOKEN": SECRET, "MLFLOW_TRACKING_PASSWORD": SECRET}
    out = cli("train", "--params", params, "--dataset", tmp_path / "ds" / "train.jsonl",
              "--metrics-dir", tmp_path / "metrics", env=env)
    assert "adapter saved" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    train_metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    assert train_metrics["steps"] == 3 and train_metrics["trainable_params"] == 120_832  # params.yaml: llm, r 64
    # what experiments are compared by (`dvc metrics diff` shows no change when nothing changed); timings apart
    assert set(train_metrics) == {"trainable_params", "steps", "train_pages", "first_loss", "final_loss"}
    assert json.loads((tmp_path / "metrics" / "train_speed.json").read_text())["pages_per_second"] > 0

    out = cli("evaluate", "--params", params, "--dataset", tmp_path / "ds" / "eval.jsonl", "--task", "document",
              "--adapter", tmp_path / "adapter", "--output", tmp_path / "results.json")
    result = json.loads((tmp_path / "results.json").read_text())
    assert set(result["summary"]) >= {"base", "finetuned"} and result["pages"]
    assert all(0 <= p["base"]["cer"] and 0 <= p["finetuned"]["ned"] <= 1 for p in result["pages"])
    assert all({"base_cer", "base_wer", "finetuned_wer", "finetuned_ned"} <= set(r) for r in result["per_doc"])
    assert result["model"] == {"family": "deepseek-ocr2", "base": str(snapshot), "resolution": "nocrop"}
    # params.yaml asking for another resolution: base and fine-tuned both read the pages as the adapter was trained
    from ocr_finetune.evaluate import evaluate
    from ocr_finetune.params import load_params

    gundam = load_params(params).with_model(resolution="gundam")
    again = evaluate(gundam, tmp_path / "ds" / "eval.jsonl", tmp_path / "adapter", progress=False)
    assert again["model"]["resolution"] == "nocrop"

    cli("infer", "--params", params, "--images", tmp_path / "pages", "--output", tmp_path / "md",
        "--adapter", tmp_path / "adapter", "--max-new-tokens", 4, "--batch-size", 3)
    assert sorted(p.stem for p in (tmp_path / "md").glob("*.md")) == sorted(p.stem for p in SAMPLES.glob("*.pdf"))

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ocr-finetune"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["lora.mode"] == "llm" and run.data.params["train.max_steps"] == "3"
    assert len(mlflow.MlflowClient().get_metric_history(run.info.run_id, "train_loss")) == 3
    # `evaluate` logged its scores to the run that trained the adapter it evaluated
    assert run.data.metrics["finetuned.cer"] == result["summary"]["finetuned"]["cer"]
    # MLflow's names are metrics/eval.json's and metrics/train.json's, as `dvc exp show` lists them
    assert {"base.ned", "cer_change", "final_loss", "trainable_params"} <= set(run.data.metrics), run.data.metrics
    assert run.data.tags.get("git_commit")
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "adapter")]
    assert "adapter/adapter_model.safetensors" in artifacts
    # secrets in the environment never reach the tracking store or the adapter's run record
    assert SECRET not in json.dumps([run.data.params, run.data.tags, run.data.metrics])
    assert SECRET not in (tmp_path / "adapter" / "ocr_finetune.json").read_text()
    import transformers

    info = json.loads((tmp_path / "adapter" / "ocr_finetune.json").read_text())
    assert info["family"] == "deepseek-ocr2" and info["versions"]["transformers"] == transformers.__version__
    assert info["base_source"] == {"repo_id": "acme/ocr-tiny", "revision": revision, "path": str(snapshot)}
    assert run.data.tags["base_revision"] == revision and run.data.tags["family"] == "deepseek-ocr2"
    assert run.data.tags["version.transformers"] == transformers.__version__


def test_set_override_is_validated(tmp_path, models_cache):
    params = small_params(tmp_path, models_cache)
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), "inspect", "--params", str(params),
                        "-S", "lora.mode=foo"], capture_output=True, text=True)
    assert r.returncode == 2 and "lora.mode" in r.stderr and "vision, llm, both" in r.stderr
    out = cli("inspect", "--params", params)
    assert "vision: 22 modules, 147,456 trainable" in out and "llm: 14 modules, 120,832 trainable" in out  # r 64


def test_pdf2img_refuses_what_it_cannot_render_and_infer_reads_upper_case_pdfs(tmp_path):
    """No PDF, page 0, dpi 0: an error naming the problem, not an empty folder or a copy of the last page.
    `infer --pdf Scan.PDF` with the text-layer teacher reads that file (it looked for `Scan.pdf`)."""
    def run(*args):
        return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    (tmp_path / "empty").mkdir()
    r = run("pdf2img", "--pdf", tmp_path / "empty", "-o", tmp_path / "out")
    assert r.returncode == 2 and "no PDF found" in r.stderr, r.stderr
    for flag, value, message in (("--start-page", 0, "the first page is 1"), ("--dpi", 0, "allowed values")):
        r = run("pdf2img", "--pdf", SAMPLES / "price_table.pdf", "-o", tmp_path / "out", flag, value)
        assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not list((tmp_path / "out").glob("*.png"))
    shutil.copy(SAMPLES / "price_table.pdf", tmp_path / "Scan.PDF")
    config = tmp_path / "teacher.yaml"
    config.write_text("teacher:\n  kind: pdf_text\n")
    cli("infer", "--pdf", tmp_path / "Scan.PDF", "--output", tmp_path / "md", "--config", config)
    text = (tmp_path / "md" / "Scan.md").read_text(encoding="utf-8")
    assert "<!--" not in text and "|" in text  # the price table, not a 'failed' comment


def test_tracking_that_cannot_be_reached_is_one_line_and_one_that_goes_away_costs_only_metrics(tmp_path,
                                                                                              monkeypatch):
    """An unreachable MLflow server was four silent minutes and a traceback; a run that lost its server
    mid-way stopped training. Now: a TrackingError naming the way out, and logging that stops with a warning.
    An adapter whose run is not in this store evaluates without it."""
    import mlflow
    import pytest

    from ocr_finetune.params import TrackingParams
    from ocr_finetune.tracking import TrackingError, start_run, why_run_unavailable

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(TrackingError, match="tracking.enabled=false"):
        with start_run(TrackingParams(tracking_uri="http://127.0.0.1:9")):
            pass
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with start_run(TrackingParams(tracking_uri=store)) as tracker:
        tracker.log_metric("loss", 1.0, step=0)
        mlflow.set_tracking_uri("http://127.0.0.1:9")  # the server goes away, and stays away
        tracker.log_metric("loss", 0.5, step=1)
        assert tracker.failed
    assert mlflow.active_run() is None  # closing it failed with a warning, not an exception
    assert why_run_unavailable(TrackingParams(tracking_uri=store), tracker.run_id) is None
    assert "not in this tracking store" in why_run_unavailable(TrackingParams(tracking_uri=store), "0" * 32)
    assert "cannot be read" in why_run_unavailable(TrackingParams(tracking_uri="http://127.0.0.1:9"), "0" * 32)
