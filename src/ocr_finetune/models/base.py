"""The small interface every model family implements (one file per family, registered in __init__)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import write_text_atomic
from ..images import load_image  # noqa: F401 - also importable from here, where it used to be


class ModelLoadError(RuntimeError):
    """A base model could not be found, downloaded or loaded; the message says what to do."""


@dataclass
class Encoded:
    """One training example as tensors: the prompt (with image tokens) followed by the target."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) -100 on BOS, prompt and image tokens
    pixel: dict  # family-specific image tensors for this one example ({} when its features are known)
    features: torch.Tensor | None = None  # its image features (train.cache_vision_features), once computed
    label_tokens: int = 0  # the whole label's tokens (EOS not counted), before any cut to train.max_label_tokens
    image_tokens: int = 0  # image tokens in input_ids (= rows of its features)
    index: int = -1  # its record in the dataset file
    cache_key: str | None = None  # its entry in the feature cache


def slug(repo_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "--", repo_id)


SOURCE = "ocr_finetune_source.json"  # written into a downloaded checkpoint: where and which revision


# Local folders the seed README names as model paths, filled from the hub on first use.
SEED_MODEL_PATHS = {"models/deepseek_ocr": "unsloth/DeepSeek-OCR"}


def resolve_checkpoint(base: str, cache_dir: str | Path, allow_download: bool, size_hint: str) -> Path:
    """A local checkpoint directory for `base` (a local path or a hub id), downloading it on first use."""
    local = Path(base).expanduser()
    seed = SEED_MODEL_PATHS.get(Path(base).as_posix().removeprefix("./").rstrip("/"))
    if seed is not None and not ((local / "config.json").is_file() and weights_complete(local)):
        return _download(seed, local, allow_download, size_hint)
    if local.is_dir():
        return local
    # a hub id is `org/name`; anything else that looks like a path is a local folder that is not there
    if base.startswith((".", "/", "~")) or "\\" in base or base.count("/") > 1 or local.exists():
        raise ModelLoadError(f"model.base={base}: no such checkpoint folder (a local path, since it is not an "
                             "`org/name` id of the Hugging Face Hub)")
    target = Path(cache_dir) / slug(base)
    if (target / "config.json").is_file() and weights_complete(target):
        return target
    return _download(base, target, allow_download, size_hint)


def _download(base: str, target: Path, allow_download: bool, size_hint: str) -> Path:
    by_hand = f"`hf download {base} --local-dir {target}`"
    if not allow_download:
        raise ModelLoadError(f"{base} is not (or only partly) in {target} and model.allow_download is false. "
                             f"Download it by hand: {by_hand}")
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    print(f"model.base={base} is not (complete) in {target}: downloading it from the Hugging Face Hub "
          f"({size_hint}; files already there are kept). Set HF_TOKEN for gated or private models.", flush=True)
    token = os.environ.get("HF_TOKEN") or None
    try:
        revision = HfApi().model_info(base, token=token).sha  # pin what we download, and record it
        snapshot_download(repo_id=base, revision=revision, local_dir=target, token=token)
    except HfHubHTTPError as e:  # the hub answered: no such repo, gated, private, or a server error
        raise ModelLoadError(
            f"the Hugging Face Hub refused {base} ({type(e).__name__}: {e}). Check the spelling of model.base; "
            f"for a gated or private model accept its terms on the hub and set HF_TOKEN.") from e
    except Exception as e:  # noqa: BLE001 - no answer: offline, DNS, proxy, TLS (httpx and OS errors alike)
        raise ModelLoadError(
            f"could not download {base} ({type(e).__name__}: {e}). If this machine is offline, download it "
            f"elsewhere with {by_hand} and copy the folder here, or set model.base to a local checkpoint "
            f"directory.") from e
    write_json(target / SOURCE, {"repo_id": base, "revision": revision})
    return target


def weights_complete(path: Path) -> bool:
    """Whether every weight file a checkpoint names is there: an interrupted download leaves config.json
    with some shards missing, and is then resumed rather than loaded."""
    if any((path / ".cache" / "huggingface" / "download").rglob("*.incomplete")):  # a file cut off mid-way
        return False
    indexes = list(path.glob("*.index.json"))  # model.safetensors.index.json, pytorch_model.bin.index.json
    if indexes:
        return all((path / shard).is_file() for index in indexes
                   for shard in json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
    if any(path.glob("*-of-*.safetensors")) or any(path.glob("*-of-*.bin")):  # shards before their index
        return False
    return any(path.glob("*.safetensors")) or any(path.glob("*.bin"))


def checkpoint_source(path: str | Path) -> dict:
    """Where a checkpoint came from and which revision: from our own download record, from the download
    metadata `hf download --local-dir` keeps, or from a Hugging Face cache snapshot's folder name; else just
    its path."""
    path = Path(path)
    if (path / SOURCE).is_file():
        return json.loads((path / SOURCE).read_text(encoding="utf-8"))
    metadata = path / ".cache" / "huggingface" / "download" / "config.json.metadata"
    if metadata.is_file():
        commit = metadata.read_text(encoding="utf-8").split("\n", 1)[0].strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return {"path": str(path), "revision": commit}
    folder = path.absolute()  # not resolved: a cache snapshot's files are links into its blob store
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name) \
            and folder.parent.parent.name.startswith("models--"):
        repo_id = folder.parent.parent.name[len("models--"):].replace("--", "/", 1)
        return {"repo_id": repo_id, "revision": folder.name, "path": str(path)}
    return {"path": str(path)}


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """JSON as browsers, vega (dvc plots) and jq read it: a NaN or infinity (a diverged loss) becomes null.
    Written whole or not at all (metrics, run info, summaries: a killed run leaves the old file)."""
    write_text_atomic(path, json.dumps(_finite(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
