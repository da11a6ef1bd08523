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
import shutil
from pathlib import Path

import torch

from .params import Params

STATE = "state.pt"
# Settings that do not change what is computed, only where it runs or what is written.
NOT_FINGERPRINTED = {"output_dir", "log_every", "save_every", "checkpoint_dir", "resume", "num_gpus", "device",
                     # how fast and in how much memory, not what is computed: a run that ran out of memory
                     # resumes with more checkpointing or smaller vision passes
                     "gradient_checkpointing", "compile", "loss_chunk", "cache_vision_features"}
MODEL_NOT_FINGERPRINTED = {"fused_sam_attention", "sam_attention_kernel", "adaptive_experts", "vision_batch",
                           "allow_download"}


def fingerprint(params: Params, train_jsonl: str | Path) -> str:
    train = {k: v for k, v in params.train.model_dump().items() if k not in NOT_FINGERPRINTED}
    model = {k: v for k, v in params.model.model_dump().items() if k not in MODEL_NOT_FINGERPRINTED}
    blob = json.dumps({"model": model, "lora": params.lora.model_dump(), "train": train,
                       "prompt": params.dataset.prompt}, sort_keys=True)
    h = hashlib.sha256(blob.encode())
    h.update(Path(train_jsonl).read_bytes())
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
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def save(self, step: int, losses: list[float], model, optimizer, schedule) -> None:
        """Atomically: a run killed while saving leaves the previous checkpoint intact."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        tmp = self.path.with_suffix(".tmp")
        torch.save({"step": step, "losses": losses, "trainable": trainable, "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict()}, tmp)
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

    def clear(self) -> None:
        shutil.rmtree(self.folder / self.key, ignore_errors=True)
