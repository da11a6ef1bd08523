"""Image features of frozen vision towers, kept on disk and keyed by what they are computed from.

With LoRA on the language model only (`lora.mode: llm`) the vision towers are frozen and dropout-free, so a
page's features are the same at every step, in every epoch, in a resumed run and in the next experiment on the
same pages (`dvc exp run -S lora.r=32`). Computing them costs more than half of an llm step (H200, batch 4: 188
of 347 ms); holding them in RAM costs 2.9 MB a page at full size (1121 x 1280 in bf16), 5.8 GB for 2,000 pages.
So they live on disk: one safetensors file per page (read memory-mapped, written whole and renamed in place, so
readers never see half a file and several processes may share the folder), named by a hash of

    the page image's bytes + the model (family, checkpoint, its config and weight files) + the resolution
    preset + the dtype + the SAM attention kernel,

so a changed page, model, resolution or dtype can only miss, never read a stale entry. An entry is the page's
own: the training loop computes it with the page alone (`train.fill_image_features`), never with the pages
that shared its first batch, so what a run reads does not depend on the batch sizes of the runs before it.
The folder is bounded (`train.feature_cache_gib`): past it, the entries read least recently go first.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .models.base import checkpoint_source


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def model_key(params, checkpoint: str | Path, dtype: torch.dtype) -> str:
    """What a page's features depend on besides the page: the checkpoint (by its source, config and weight
    files' names, sizes and times: hashing gigabytes of weights per run would cost more than it guards) and
    the settings that change the towers' arithmetic."""
    checkpoint = Path(checkpoint)
    weights = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in checkpoint.iterdir()
                     if p.suffix in (".safetensors", ".bin"))
    config = checkpoint / "config.json"
    m = params.model
    blob = json.dumps({"family": m.family, "source": checkpoint_source(checkpoint), "weights": weights,
                       "config": file_digest(config) if config.is_file() else None, "resolution": m.resolution,
                       "dtype": str(dtype), "4bit": m.load_in_4bit,
                       "sam": m.sam_attention_kernel if m.fused_sam_attention else "unfused"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class FeatureCache:
    def __init__(self, folder: str | Path, model: str, max_bytes: int):
        self.folder, self.model, self.max_bytes = Path(folder), model, max_bytes
        self._size: int | None = None  # bytes in the folder, counted on the first write of this process
        self._lock = threading.Lock()

    def trim(self) -> None:
        """Down to the size limit now (a run with a smaller `train.feature_cache_gib` than the last)."""
        with self._lock:
            self._size = self.size()
            if self._size > self.max_bytes:
                self._size = self.evict(int(0.9 * self.max_bytes))

    def key(self, image: str | Path) -> str:
        return hashlib.sha256(f"{self.model}:{file_digest(image)}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, int] | None:
        """(features, the page's image-token count) or None. A damaged entry is a miss (and is replaced)."""
        path = self._path(key)
        try:
            tensors = load_file(path)
            os.utime(path)  # read recently: evicted last
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a file cut short by a crash reads as a safetensors error: recompute
            return None
        return tensors["features"], int(tensors["image_tokens"])

    def put(self, key: str, features: torch.Tensor, image_tokens: int) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        save_file({"features": features.contiguous(), "image_tokens": torch.tensor(image_tokens)}, str(tmp))
        os.replace(tmp, path)
        with self._lock:
            if self._size is None:
                self._size = self.size()
            else:
                self._size += path.stat().st_size
            if self._size > self.max_bytes:
                self._size = self.evict(int(0.9 * self.max_bytes))

    def entries(self) -> list[Path]:
        return list(self.folder.glob("*/*.safetensors")) if self.folder.is_dir() else []

    def size(self) -> int:
        return sum(p.stat().st_size for p in self.entries())

    def evict(self, target: int) -> int:
        """Delete the entries read least recently until the folder holds at most `target` bytes."""
        stats = []
        for p in self.entries():
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it
                continue
            stats.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in stats)
        for _, size, p in sorted(stats):
            if total <= target:
                break
            p.unlink(missing_ok=True)
            total -= size
        return total
