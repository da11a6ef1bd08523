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


@pytest.mark.parametrize("mode", ["both", "llm"])  # llm: each process computes half the vision features
def test_two_processes_train_what_one_trains(tmp_path, models_cache, sample_dataset, mode):
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        params = small_params(out, models_cache, lora={"mode": mode},
                              train={"num_gpus": n, "device": "cpu", "batch_size": 4, "max_steps": 3,
                                     "max_label_tokens": 160, "learning_rate": 1e-3})
        stdout = cli("train", "--params", params, "--dataset", sample_dataset, "--output", out / "adapter",
                     "--metrics-dir", out / "metrics")
        runs[n] = out
        assert f"on {n} process(es)" in stdout
        if n == 2:
            assert "torch.distributed.run" in stdout and "--nproc_per_node=2" in stdout

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


def _feature_worker(rank: int, world: int, path: str, port: int, out: str) -> None:
    import os

    from PIL import Image, ImageDraw

    from ocr_finetune.distributed import Dist
    from ocr_finetune.lora import attach_lora_from_params
    from ocr_finetune.models import get_family
    from ocr_finetune.params import LoraParams
    from ocr_finetune.train import cache_vision_features

    if world > 1:  # a spawned process: its environment is its own
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    family = get_family("deepseek-ocr2")
    processor = family.load_processor(path, "nocrop")  # one view a page: images through the tower = pages
    pages = []
    for i in range(5):
        im = Image.new("RGB", (300, 400), "white")
        ImageDraw.Draw(im).rectangle([20, 20 + 40 * i, 280, 60 + 40 * i], fill="black")
        pages.append(family.encode_example(processor, im, "<image>\nFree OCR.", f"line {i}", 16))
    torch.manual_seed(0)
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams(mode="llm"))
    patch_embed = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3)
    images = []
    patch_embed.register_forward_pre_hook(lambda _, args: images.append(args[0].shape[0]))
    cache_vision_features(model, family, pages, 1, "cpu", torch.float32, False, Dist(rank, rank, world))
    torch.save({"images": sum(images), "features": [p.features for p in pages]}, f"{out}/{world}-{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def test_vision_feature_pass_is_shared_between_processes(tmp_path, tiny_dir):
    """Mode llm under DDP: each of 2 processes runs the towers on its own pages only (3 and 2 of 5), and
    both end with every page's features, equal to those of one process."""
    import socket

    import torch.multiprocessing as mp

    _feature_worker(0, 1, str(tiny_dir), 0, str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_feature_worker, args=(2, str(tiny_dir), port, str(tmp_path)), nprocs=2)
    alone = torch.load(tmp_path / "1-0.pt")
    shared = [torch.load(tmp_path / f"2-{r}.pt") for r in (0, 1)]
    assert alone["images"] == 5
    assert [s["images"] for s in shared] == [3, 2]
    for s in shared:
        assert len(s["features"]) == 5
        for a, b in zip(alone["features"], s["features"]):
            assert torch.allclose(a, b, atol=1e-5)
