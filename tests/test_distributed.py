"""Data-parallel training on CPU: 2 gloo processes started by `ocr-finetune train` itself (train.num_gpus=2)
must train the same adapter, with the same loss curve, as 1 process at the same global batch."""

import csv

import pytest
import torch
from safetensors.torch import load_file

from test_cli import cli, small_params

from ocr_finetune.params import ParamsError, validate_params


def losses(path):
    with open(path) as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


# llm: each process computes half the vision features. Mode both (vision LoRA gradients reduced too) was cut
# for the suite's time (48 s); the DDP wrapper and the loss weighting it exercised are the same code.
@pytest.mark.parametrize("mode", ["llm"])
def test_two_processes_train_what_one_trains(tmp_path, models_cache, sample_dataset, mode):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        params = small_params(out, models_cache, lora={"mode": mode},
                              train={"num_gpus": n, "device": "cpu", "batch_size": 4, "max_steps": 3,
                                     "max_label_tokens": 160, "learning_rate": 1e-3,
                                     "feature_cache_dir": str(out / "feature_cache")})
        stdout = cli("train", "--params", params, "--dataset", sample_dataset, "--output", out / "adapter",
                     "--metrics-dir", out / "metrics")
        runs[n] = out
        assert f"on {n} process(es)" in stdout
        if n == 2:
            assert "torch.distributed.run" in stdout and "--nproc_per_node=2" in stdout
        if mode == "llm":  # each page's features computed by one process and stored once in the shared cache
            cache = sorted(p.name for p in (out / "feature_cache").glob("*/*.safetensors"))
            assert len(cache) == len(set(cache)) > 0
            runs_cache = runs.setdefault("cache", [])
            runs_cache.append(cache)

    if mode == "llm":  # the same pages, the same model: the same cache entries from 1 and 2 processes
        assert runs["cache"][0] == runs["cache"][1]
    one, two = losses(runs[1] / "metrics" / "train_loss.csv"), losses(runs[2] / "metrics" / "train_loss.csv")
    assert len(one) == len(two) == 3
    # Same global batch, token-weighted loss: the curves agree to float rounding, not just in trend.
    assert one == pytest.approx(two, rel=1e-4)

    a = load_file(runs[1] / "adapter" / "adapter_model.safetensors")
    b = load_file(runs[2] / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    ref = torch.cat([a[k].flatten() for k in a]).norm()
    assert ref > 0 and diff / ref < 1e-3, float(diff / ref)

    # rank 0 alone logs: one MLflow run for the 2-process training
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'p2' / 'mlflow.db'}")
    runs_logged = mlflow.search_runs(experiment_names=["ocr-finetune"], output_format="list")
    assert len(runs_logged) == 1
    assert runs_logged[0].data.tags["num_gpus"] == "2"


def test_batch_must_split_evenly_over_gpus():
    with pytest.raises(ParamsError, match="train.*batch_size \\(3\\) must be a multiple of num_gpus \\(2\\)"):
        validate_params({"train": {"batch_size": 3, "num_gpus": 2}})


def test_each_process_prepares_only_its_share_of_every_micro_batch(tmp_path, tiny_dir, sample_dataset):
    """Under DDP each rank's loader reads only its pages of each micro-batch: together the ranks cover every
    micro-batch of the plan exactly once, in the plan's order."""
    from ocr_finetune.data import TrainPages, step_plan, train_batches
    from ocr_finetune.dataset import JsonlPages
    from ocr_finetune.models import get_family

    family = get_family("deepseek-ocr2")
    processor = family.load_processor(tiny_dir, "nocrop")
    records = JsonlPages(sample_dataset)
    dataset = TrainPages(records, family, processor, torch.float32, 32)
    plan = step_plan(len(records), 4, 2, steps=3, seed=0)
    seen = {}
    for rank in (0, 1):
        batches = list(train_batches(dataset, plan, rank, 2, processor.tokenizer.pad_token_id, True, workers=1,
                                     pin_memory=False))
        seen[rank] = [[x.index for x in mb.pages] for mb in batches]
        assert [mb.last_of_step for mb in batches] == [False, True] * 3
        assert all(mb.tensors["input_ids"].shape[0] == 2 for mb in batches)
    micro = [mb for step in plan for mb in step]
    assert [sorted(a + b) for a, b in zip(seen[0], seen[1])] == [sorted(mb) for mb in micro]
    assert all(a == mb[0::2] and b == mb[1::2] for a, b, mb in zip(seen[0], seen[1], micro))
