"""An interrupted training resumes from its last checkpoint and ends exactly where an uninterrupted run ends."""

import csv
import json
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_cli import cli, small_params


def run_params(folder, models_cache, checkpoints):
    folder.mkdir()
    # dropout on: the random states must come back with the weights for the curves to match
    return small_params(folder, models_cache, lora={"mode": "both", "dropout": 0.1},
                        train={"max_steps": 12, "save_every": 2, "checkpoint_dir": str(checkpoints),
                               "batch_size": 2, "max_label_tokens": 48, "device": "cpu"},
                        tracking={"enabled": False})


def train_args(params, folder, dataset):
    return ["train", "--params", params, "--dataset", dataset, "--output", folder / "adapter",
            "--metrics-dir", folder / "metrics"]


def losses(folder):
    with open(folder / "metrics" / "train_loss.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_killed_run_resumes_where_it_stopped(tmp_path, models_cache, sample_dataset):
    ref = tmp_path / "ref"
    cli(*train_args(run_params(ref, models_cache, tmp_path / "ckpt-ref"), ref, sample_dataset))

    run, checkpoints = tmp_path / "run", tmp_path / "ckpt"
    args = train_args(run_params(run, models_cache, checkpoints), run, sample_dataset)
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(checkpoints.glob("*/state.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no cleanup, as when a machine goes away
    proc.wait()
    assert not (run / "adapter").exists(), "the run finished before it could be interrupted"
    saved_at = torch.load(next(checkpoints.glob("*/state.pt")), weights_only=True)["step"]
    assert 2 <= saved_at < 12

    out = cli(*args, "--resume")
    assert f"resuming from step {saved_at} of 12" in out
    assert losses(run) == losses(ref)  # the full curve, first steps restored from the checkpoint
    a, b = load_file(run / "adapter" / "adapter_model.safetensors"), load_file(ref / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    assert not list(checkpoints.glob("*/state.pt"))  # finished runs leave no checkpoint behind


def test_resume_without_a_checkpoint_is_an_error(tmp_path, models_cache, sample_dataset):
    folder = tmp_path / "x"
    params = run_params(folder, models_cache, tmp_path / "none")
    r = subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, train_args(params, folder, sample_dataset)),
                        "--resume"], capture_output=True, text=True)
    assert r.returncode != 0 and "train.resume=require" in r.stderr


def test_step_plan_fills_every_batch_and_covers_each_epoch():
    from collections import Counter

    from ocr_finetune.data import step_plan

    # more pages in a batch than the dataset has: batches stay full (pages/s was overstated when they were not)
    for n_pages, batch, accum in [(16, 24, 1), (3, 8, 2), (10, 4, 1), (5, 5, 3)]:
        plan = step_plan(n_pages, batch, accum, steps=6, seed=1)
        micro = [mb for step in plan for mb in step]
        assert len(plan) == 6 and all(len(step) == accum for step in plan)
        assert all(len(mb) == batch for mb in micro)
        seen = [i for mb in micro for i in mb]
        whole_epochs = len(seen) // n_pages
        for e in range(whole_epochs):  # each epoch shows every page exactly once, in its own order
            assert sorted(seen[e * n_pages:(e + 1) * n_pages]) == list(range(n_pages))
        assert max(Counter(seen).values()) <= whole_epochs + 1
    assert step_plan(10, 4, 1, 5, seed=0) == step_plan(10, 4, 1, 5, seed=0)  # every rank draws the same plan
    assert step_plan(10, 4, 1, 5, seed=0) != step_plan(10, 4, 1, 5, seed=1)


def test_checkpoint_fingerprint_ignores_speed_settings_only(tmp_path):
    """A run that ran out of memory resumes with other speed settings; anything that changes what is trained
    starts afresh."""
    from ocr_finetune.checkpoint import fingerprint
    from ocr_finetune.params import validate_params

    from PIL import Image

    from ocr_finetune.dataset import make_record

    data = tmp_path / "train.jsonl"
    Image.new("RGB", (40, 60), "white").save(tmp_path / "a_p1.png")
    data.write_text(json.dumps(make_record("a_p1.png", "<image>\nFree OCR.", "text", "a", 1)) + "\n")

    def key(**sections):
        return fingerprint(validate_params(sections), data)

    base = key()
    for speed in ({"train": {"gradient_checkpointing": "vision", "compile": "none", "loss_chunk": 0}},
                  {"model": {"vision_batch": 4, "adaptive_experts": False, "fused_sam_attention": False}},
                  # the machine of a multi-node run: every node must find the one checkpoint folder
                  {"train": {"batch_size": 4, "num_gpus": 2, "nodes": {"nnodes": 2, "node_rank": 1,
                                                                       "rdzv_endpoint": "10.0.0.1:29500"}}}):
        if "nodes" in speed.get("train", {}):
            assert key(**speed) == key(train={"batch_size": 4}), speed
            continue
        assert key(**speed) == base, speed
    for change in ({"train": {"learning_rate": 1e-4}}, {"train": {"batch_size": 3}}, {"lora": {"mode": "llm"}},
                   {"model": {"resolution": "gundam"}}):
        assert key(**change) != base, change
    # pages rendered again (another dpi) under the same names: the JSONL is the same, the pixels are not
    Image.new("RGB", (20, 30), "white").save(tmp_path / "a_p1.png")
    assert key() != base
