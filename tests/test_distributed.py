"""Data-parallel training on CPU: 2 gloo processes started by `ocr-finetune train` itself (train.num_gpus=2)
must train the same adapter, with the same loss curve, as 1 process at the same global batch."""

import csv
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from test_cli import cli, small_params

from ocr_finetune import distributed
from ocr_finetune.params import ParamsError, load_params, validate_params


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
            assert "torch.distributed.run --nproc-per-node=2 --standalone" in stdout
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


def nodes(**kw):
    return {"train": {"batch_size": 12, "num_gpus": 2, "nodes": kw}}


def test_batch_must_split_evenly_over_the_processes_of_all_nodes():
    with pytest.raises(ParamsError, match=r"train.*batch_size \(8\) must be a multiple of nodes.nnodes x num_gpus "
                                          r"\(3 x 2 = 6\)"):
        validate_params({"train": {"batch_size": 8, "num_gpus": 2,
                                   "nodes": {"nnodes": 3, "rdzv_endpoint": "node0:29500"}}})
    validate_params({"train": {"batch_size": 6, "num_gpus": 2, "nodes": {"nnodes": 3, "rdzv_endpoint": "node0:29500"}}})


@pytest.mark.parametrize("nodes_, message", [
    ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "node0:29500"},
     r"train.nodes.node_rank \(2\) must be below train.nodes.nnodes \(2\)"),
    ({"node_rank": 1}, r"train.nodes.node_rank \(1\) must be below train.nodes.nnodes \(1\)"),
    ({"nnodes": 2}, r"train.nodes.rdzv_endpoint '': train.nodes.nnodes 2 needs the host:port"),
    ({"nnodes": 2, "rdzv_endpoint": "node0"}, r"train.nodes.rdzv_endpoint 'node0'"),
    ({"nnodes": 2, "rdzv_endpoint": ":29500"}, r"train.nodes.rdzv_endpoint ':29500'"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:70000"}, r"train.nodes.rdzv_endpoint 'node0:70000'"),
    ({"rdzv_backend": "etcd"}, r"train.nodes.rdzv_backend.*allowed values: static, c10d"),
    ({"nnodes": 0}, r"train.nodes.nnodes"),
])
def test_node_settings_are_checked_and_errors_name_the_key(nodes_, message):
    with pytest.raises(ParamsError, match=message):
        validate_params(nodes(**nodes_))


def test_torchrun_command_one_node_two_nodes_and_c10d():
    target = ["-m", "ocr_finetune.cli", "train", "--params", "p.yaml"]
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = validate_params({"train": {"batch_size": 2, "num_gpus": 2}}).train
    assert distributed.torchrun_command(one, target) == [*run, "--nproc-per-node=2", "--standalone", *target]

    # static rendezvous: the same command on every machine but its --node-rank; node 0 serves the endpoint
    two = validate_params(nodes(nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29500")).train
    assert distributed.torchrun_command(two, target) == [
        *run, "--nproc-per-node=2", "--nnodes=2", "--rdzv-backend=static", "--rdzv-endpoint=10.0.0.1:29500",
        "--node-rank=1", *target]

    # c10d: no node rank (torchrun would ignore it), the job id instead; an IPv6 endpoint in brackets
    c10d = validate_params(nodes(nnodes=3, rdzv_backend="c10d", rdzv_endpoint="[fd00::1]:29400",
                                 rdzv_id="job-7")).train
    assert distributed.torchrun_command(c10d, ["stages/train.py"]) == [
        *run, "--nproc-per-node=2", "--nnodes=3", "--rdzv-backend=c10d", "--rdzv-endpoint=[fd00::1]:29400",
        "--rdzv-id=job-7", "stages/train.py"]

    # what torchrun's own parser makes of it: the flags are its flags, with these values
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(distributed.torchrun_command(two, ["x.py"])[3:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank, args.rdzv_backend, args.rdzv_endpoint,
            args.training_script) == ("2", "2", 1, "static", "10.0.0.1:29500", "x.py")


def test_relaunch_starts_torchrun_for_one_gpu_per_node_on_several_nodes(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(distributed.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    train = validate_params({"train": {"batch_size": 2, "nodes": {"nnodes": 2, "node_rank": 1,
                                                                   "rdzv_endpoint": "node0:29500"}}}).train
    with pytest.raises(SystemExit) as exit_:
        distributed.relaunch(train, ["stages/train.py"])
    assert exit_.value.code == 0
    assert calls[0][0] == distributed.torchrun_command(train, ["stages/train.py"])
    assert "--nnodes=2" in capsys.readouterr().out

    distributed.relaunch(validate_params({}).train, ["x.py"])  # one process on one node: no launcher
    assert len(calls) == 1
    monkeypatch.setenv("WORLD_SIZE", "2")  # already under torchrun: nothing to start
    distributed.relaunch(train, ["x.py"])
    assert len(calls) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_what_one_process_trains(tmp_path, models_cache, sample_dataset):
    """Two torchrun invocations, as on two machines (each its own params, output, metrics, MLflow, feature
    cache; the pages as copied to both): --nnodes 2 --nproc-per-node 1, meeting at one static rendezvous on
    127.0.0.1, gloo. They train the adapter one process trains at the same global batch; node 0 writes it."""
    train = {"device": "cpu", "batch_size": 2, "max_steps": 2, "max_label_tokens": 160, "learning_rate": 1e-3}

    def setup_node(name, **nodes_):
        out = tmp_path / name
        out.mkdir()
        params = small_params(out, models_cache, lora={"mode": "llm"},
                              train={**train, "feature_cache_dir": str(out / "feature_cache"), "nodes": nodes_})
        return out, params, ["train", "--params", str(params), "--dataset", str(sample_dataset),
                             "--output", str(out / "adapter"), "--metrics-dir", str(out / "metrics")]

    t0 = time.time()
    one, _, args = setup_node("one")
    cli(*args)
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = []
    for rank in (0, 1):
        out, params, args = setup_node(f"node{rank}", nnodes=2, node_rank=rank, rdzv_endpoint=endpoint)
        # what `ocr-finetune train` runs on that machine (relaunch) with these params
        cmd = distributed.torchrun_command(load_params(params).train, ["-m", "ocr_finetune.cli", *args])
        assert cmd[3:8] == ["--nproc-per-node=1", "--nnodes=2", "--rdzv-backend=static",
                            f"--rdzv-endpoint={endpoint}", f"--node-rank={rank}"]
        procs.append(subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "on 2 process(es)" in logs[0] and "adapter saved" not in logs[1]

    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    assert not (node1 / "adapter").exists() and not (node1 / "metrics").exists()  # rank 0 alone writes
    assert losses(one / "metrics" / "train_loss.csv") == pytest.approx(
        losses(node0 / "metrics" / "train_loss.csv"), rel=1e-4)
    a = load_file(one / "adapter" / "adapter_model.safetensors")
    b = load_file(node0 / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = torch.cat([(a[k] - b[k]).flatten() for k in a]).norm()
    ref = torch.cat([a[k].flatten() for k in a]).norm()
    assert ref > 0 and diff / ref < 1e-3, float(diff / ref)
    print(f"1 process + 2 nodes: {time.time() - t0:.0f} s")


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
