"""The small interface every model family implements (one file per family, registered in __init__)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image


class ModelLoadError(RuntimeError):
    """A base model could not be found, downloaded or loaded; the message says what to do."""


@dataclass
class Encoded:
    """One training example as tensors: the prompt (with image tokens) followed by the target."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) -100 on BOS, prompt and image tokens
    pixel: dict  # family-specific image tensors for this one example
    features: torch.Tensor | None = None  # its image features (train.cache_vision_features), once computed


def slug(repo_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", repo_id)


SOURCE = "ocr_finetune_source.json"  # written into a downloaded checkpoint: where and which revision


def resolve_checkpoint(base: str, cache_dir: str | Path, allow_download: bool, size_hint: str) -> Path:
    """A local checkpoint directory for `base` (a local path or a hub id), downloading it on first use."""
    local = Path(base)
    if local.is_dir():
        return local
    target = Path(cache_dir) / slug(base)
    if (target / "config.json").is_file():
        return target
    if not allow_download:
        raise ModelLoadError(f"{base} is not in {target} and model.allow_download is false. Download it by hand: "
                             f"`huggingface-cli download {base} --local-dir {target}`")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    print(f"model.base={base} is not in {target}: downloading it from the Hugging Face Hub ({size_hint}). "
          f"Set HF_TOKEN for gated or private models.", flush=True)
    token = os.environ.get("HF_TOKEN") or None
    try:
        revision = HfApi().model_info(base, token=token).sha  # pin what we download, and record it
        snapshot_download(repo_id=base, revision=revision, local_dir=target, token=token)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise ModelLoadError(
            f"could not download {base} ({type(e).__name__}: {e}). If this machine is offline, download it "
            f"elsewhere with `huggingface-cli download {base} --local-dir {target}` and copy the folder here, "
            f"or set model.base to a local checkpoint directory.") from None
    write_json(target / SOURCE, {"repo_id": base, "revision": revision})
    return target


def checkpoint_source(path: str | Path) -> dict:
    """Where a checkpoint came from: hub id and revision when we downloaded it, else just its path."""
    path = Path(path)
    if (path / SOURCE).is_file():
        return json.loads((path / SOURCE).read_text(encoding="utf-8"))
    return {"path": str(path)}


def load_image(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"page image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
