"""Data-parallel training (DDP): one process per GPU, or per CPU process with the gloo backend.

`torchrun` and `accelerate launch` start the processes and set RANK, LOCAL_RANK and WORLD_SIZE; `setup` reads
them, so `train` runs unchanged under either. `relaunch` lets `dvc repro` and `ocr-finetune train` start
torchrun themselves when `train.num_gpus` > 1, so a user never types the launcher. On several machines
(`train.nodes`) each runs the same command and torchrun's rendezvous joins them (`torchrun_command`,
docs/multi_node.md).

Batch semantics (the same whatever the GPU count, so a run on 2 GPUs reproduces the 1-GPU run):
`train.batch_size` pages per forward pass in total, split evenly over the processes; `train.grad_accum` such
passes per optimizer step. The learning rate belongs to that global batch and needs no scaling when
`num_gpus` or the node count changes.
"""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def under_launcher() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup(device: str) -> tuple[Dist, str]:
    """Join the process group when started by a launcher; returns the ranks and this process's device."""
    if not under_launcher():
        return Dist(), device
    d = Dist(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), int(os.environ["WORLD_SIZE"]))
    if device == "cuda":
        if d.local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"process {d.rank} wants GPU {d.local_rank} but only {torch.cuda.device_count()} "
                               f"are visible: lower train.num_gpus")
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return d, device


def teardown() -> None:
    """Leave the process group.

    gloo finishes collectives on its own thread, which takes the GIL to free the Python tensors they held.
    Destroying the group joins that thread; done while the thread still waits for the GIL (which the main
    thread holds), both wait forever. A test caught this as a rare hang after training. So: drop the DDP
    wrapper first (train does), pass a barrier, give the thread the GIL to drain, then destroy.
    """
    if dist.is_initialized():
        dist.barrier()
        gc.collect()
        time.sleep(0.2)  # sleeping releases the GIL to gloo's thread
        dist.destroy_process_group()


def sum_across(value, d: Dist, device: str):
    """A number, or a list of numbers, summed over the processes (one all-reduce)."""
    if not d.enabled:
        return value
    t = torch.tensor(value if isinstance(value, list) else [value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist() if isinstance(value, list) else t.item()


def merge_across(mapping: dict, d: Dist) -> dict:
    """Dicts gathered from every process into one (for small bookkeeping, not tensors)."""
    if not d.enabled:
        return mapping
    parts = [None] * d.world_size
    dist.all_gather_object(parts, mapping)
    return {k: v for part in parts for k, v in part.items()}


def parameters_digest(model) -> str:
    """A hash of every trainable tensor: equal on all ranks when the replicas are in sync."""
    h = hashlib.sha256()
    for name, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def check_replicas_identical(model, d: Dist) -> bool:
    """All ranks compare their trainable weights; raises if any replica drifted (a DDP bug or a
    non-deterministic update), because the adapter rank 0 saves would then not be what the others trained."""
    if not d.enabled:
        return True
    digests = [None] * d.world_size
    dist.all_gather_object(digests, parameters_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"LoRA weights differ across ranks after training: {digests}")
    return True


def torchrun_command(train, target: list[str]) -> list[str]:
    """The torchrun command line that starts this machine's `train.num_gpus` processes on `target`.

    One node: `--standalone` (a private rendezvous on a free local port). Several (`train.nodes.nnodes`):
    every machine runs the same command but for `--node-rank`, and meets the others at `rdzv_endpoint`.
    `train` is the TrainParams section; `target` is a script path and its arguments, or ["-m", module, ...].
    """
    nodes = train.nodes
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={train.num_gpus}"]
    if nodes.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nodes.nnodes}", f"--rdzv-backend={nodes.rdzv_backend}",
                f"--rdzv-endpoint={nodes.rdzv_endpoint}"]
        # static: the machine says which node it is; c10d: ranks go by joining order, under one job id
        static = nodes.rdzv_backend == "static"
        cmd.append(f"--node-rank={nodes.node_rank}" if static else f"--rdzv-id={nodes.rdzv_id}")
    return [*cmd, *target]


def relaunch(train, target: list[str]) -> None:
    """When training needs several processes (`train.num_gpus` > 1 or `train.nodes.nnodes` > 1) and no launcher
    started us, run `torchrun_command(train, target)` and exit with its status.

    `train` is the TrainParams section.
    """
    num_gpus = train.num_gpus
    if num_gpus * train.nodes.nnodes <= 1 or under_launcher():
        return
    if torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        sys.exit(f"error: train.num_gpus={num_gpus} but {torch.cuda.device_count()} CUDA GPU(s) are visible")
    cmd = torchrun_command(train, target)
    # torchrun would pin every process to one CPU thread; batching pages on the CPU needs more.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // num_gpus)), **os.environ}
    print("launching:", " ".join(cmd), flush=True)
    sys.exit(subprocess.call(cmd, env=env))
