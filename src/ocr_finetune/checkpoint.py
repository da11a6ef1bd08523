"""Training checkpoints: an interrupted run resumes where it stopped, never from a run with other settings.

A checkpoint holds the trainable (LoRA) weights, the optimizer and schedule state, the step and the losses so
far. It is keyed by a fingerprint of everything that shapes the optimisation (model, LoRA, training params,
the training data), so changing a param starts afresh instead of resuming someone else's run. The number of
GPUs is not in the fingerprint: the global batch does not depend on it, so a run may resume on other GPUs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from .dataset import JsonlPages
from .feature_cache import file_digest
from .params import Params

STATE = "state.pt"
# Settings that do not change what is computed, only where it runs or what is written.
NOT_FINGERPRINTED = {"output_dir", "log_every", "save_every", "checkpoint_dir", "resume", "device",
                     # where it runs: the same global batch on one GPU, several, or several machines (each
                     # machine's node_rank would otherwise send it to a checkpoint folder of its own)
                     "num_gpus", "nodes",
                     # how fast and in how much memory, not what is computed: a run that ran out of memory
                     # resumes with more checkpointing or smaller vision passes
                     "gradient_checkpointing", "compile", "loss_chunk", "cache_vision_features",
                     "feature_cache_dir", "feature_cache_gib", "num_workers", "prefetch"}
MODEL_NOT_FINGERPRINTED = {"fused_sam_attention", "sam_attention_kernel", "adaptive_experts", "vision_batch",
                           "allow_download"}


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used."""


def fingerprint(params: Params, train_jsonl: str | Path) -> str:
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_FINGERPRINTED}
    model = {k: v for k, v in params.model.model_dump().items() if k not in MODEL_NOT_FINGERPRINTED}
    blob = json.dumps({"model": model, "lora": params.lora.model_dump(), "train": train,
                       "prompt": params.dataset.prompt}, sort_keys=True)
    h = hashlib.sha256(blob.encode())
    h.update(Path(train_jsonl).read_bytes())
    # the JSONL names its images, not their pixels: pages rendered again at another dpi keep the same file.
    # Hashed in threads (hashlib releases the GIL): a serial pass over 100k pages held the GPU up for minutes.
    images = sorted({str(image) for image in JsonlPages(train_jsonl).images()})
    with ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 4)) as pool:
        for digest in pool.map(file_digest, images):
            h.update(bytes.fromhex(digest))
    return h.hexdigest()[:16]


class Checkpoints:
    def __init__(self, folder: str | Path, key: str):
        self.folder, self.key = Path(folder), key

    @property
    def path(self) -> Path:
        return self.folder / self.key / STATE

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, pickle, zip errors for a damaged file
            raise CheckpointError(f"{self.path} cannot be read ({type(e).__name__}: {str(e)[:200]}); delete "
                                  f"{self.path.parent} to train afresh") from None

    def save(self, step: int, losses: list[float], model, optimizer, schedule) -> None:
        """Atomically: a run killed while saving leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        tmp = self.path.with_suffix(".tmp")
        # the random states too: dropout after a resume draws what it would have drawn without the stop (the
        # saving process's states: with several GPUs the other ranks' dropout resumes from fresh states)
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "losses": losses, "trainable": trainable, "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(), "rng": rng}, tmp)
        os.replace(tmp, self.path)

    @staticmethod
    def restore(state: dict, model, optimizer, schedule) -> None:
        params = dict(model.named_parameters())
        missing = set(n for n, p in params.items() if p.requires_grad) - set(state["trainable"])
        if missing:
            raise RuntimeError(f"checkpoint lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[0]}")
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng = state.get("rng")
        if rng:  # checkpoints written before the random states were kept resume without them
            torch.set_rng_state(rng["torch"])
            random.setstate((3, tuple(rng["python"]), None))
            if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(rng["cuda"])

    def clear(self) -> None:
        shutil.rmtree(self.folder / self.key, ignore_errors=True)
