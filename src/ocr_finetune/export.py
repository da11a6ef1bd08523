"""Export a trained adapter for serving.

- `merged`: the adapter folded into the base weights (`merge_and_unload`) and saved with the processor. Like
  every checkpoint transformers saves for these classes, the weights carry the original checkpoints' names
  (`model.sam_model.blocks...`, `model.layers...`, one tensor per expert): the names vLLM's DeepSeek-OCR
  loaders read. A vision adapter must be merged this way: vLLM serves LoRA on the language model only.
- `vllm-lora`: an `llm` adapter kept separate (serve one base, switch adapters per request), its tensors
  under the original checkpoint's names (`model.layers...`), which is what vLLM maps its LoRA weights from:
  as `lora.save_adapter` saves them, or renamed from our in-memory module paths
  (`model.language_model.layers...`) for an adapter saved before it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .lora import ADAPTER_WEIGHTS, adapter_weights, load_adapter, read_adapter_tensors
from .models.base import write_json
from .params import Params
from .loading import RUN_INFO, adapter_params, load_base, read_run_info

# Our module paths -> the original checkpoints' (the reverse of transformers' load-time renaming).
_TO_ORIGINAL = [(r"\.model\.language_model\.", ".model.")]


def original_name(key: str) -> str:
    for pattern, repl in _TO_ORIGINAL:
        key = re.sub(pattern, repl, key)
    return key


def export_merged(params: Params, adapter_dir: str | Path, out_dir: str | Path,
                  dtype: torch.dtype = torch.bfloat16) -> Path:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    params = adapter_params(params, adapter_dir)
    # Merging needs the base's full-precision weights, also for an adapter trained on a 4-bit base (QLoRA):
    # the export is the base in `dtype` plus the adapter, on the CPU.
    params = params.with_model(load_in_4bit=False)
    _, model, processor, _ = load_base(params, "cpu", dtype)
    merged = load_adapter(model, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    _copy_run_info(adapter_dir, out_dir, "merged")
    return out_dir


def export_vllm_lora(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    weights = read_adapter_tensors(adapter_weights(adapter_dir))
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    # the language model's layers, under either name (original checkpoint's, or in-memory for older adapters)
    llm = re.compile(r"base_model\.model\.model\.(language_model\.)?layers\.\d+\.")
    outside = sorted(k for k in weights if not llm.match(k))
    if outside or config.get("target_parameters"):
        raise ValueError(f"{adapter_dir}: vLLM serves LoRA on the language model's linear layers only; this adapter "
                         f"also adapts {outside[0] if outside else 'the routed experts'}. Export it merged instead "
                         f"(`ocr-finetune export --format merged`).")
    renamed = {original_name(k): v.contiguous() for k, v in weights.items()}
    modules = sorted({re.sub(r"\.lora_[AB]\.weight$", "", k).split(".")[-1] for k in renamed})
    config.update(target_modules=modules, target_parameters=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(renamed, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_run_info(adapter_dir, out_dir, "vllm-lora")
    return out_dir


def _copy_run_info(adapter_dir: Path, out_dir: Path, fmt: str) -> None:
    info = read_run_info(adapter_dir)
    write_json(out_dir / RUN_INFO, {**info, "exported_as": fmt, "exported_from": str(adapter_dir)})


def checkpoint_keys(path: str | Path) -> dict[str, tuple]:
    """name -> shape of every tensor in a saved checkpoint (all shards)."""
    from safetensors import safe_open

    shapes = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes

