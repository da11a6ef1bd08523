"""Loading a base model (and what an adapter was trained on): shared by train, evaluate, infer and export."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import get_family
from .models.moe import use_adaptive_experts
from .params import Params

RUN_INFO = "ocr_finetune.json"  # written beside the adapter: what it was trained from


def load_base(params: Params, device: str, dtype: torch.dtype):
    """The family module, the base model on `device` with the speed settings of `params.model`, its processor
    at `params.model.resolution`, and the checkpoint folder it came from."""
    family = get_family(params.model.family)
    path = checkpoint_path(params)
    extra = quantization(dtype, device) if params.model.load_in_4bit else {}
    model = family.load_model(path, dtype, device, **extra)
    # on CUDA only: on the CPU the longer heads cost more than the bias they replace (tiny model, 8 gundam
    # pages: 2.14 s a page fused against 0.96 s)
    if params.model.fused_sam_attention and device.startswith("cuda"):
        family.use_fused_sam_attention(model, params.model.sam_attention_kernel)
    if params.model.adaptive_experts and device.startswith("cuda"):  # on CPU grouped_mm is faster
        use_adaptive_experts(model)
    family.chunk_vision_tower(model, params.model.vision_batch)
    return family, model, load_processor(params, path), path


def checkpoint_path(params: Params) -> Path:
    """The folder of `params.model.base` (downloaded into model.cache_dir on first use, where allowed)."""
    m = params.model
    return get_family(m.family).checkpoint_dir(m.base, m.cache_dir, m.allow_download)


def load_processor(params: Params, path: str | Path):
    """The processor alone (no weights): data-loading workers need only this."""
    return get_family(params.model.family).load_processor(path, params.model.resolution)


def quantization(dtype: torch.dtype, device: str) -> dict:
    """QLoRA loading: language-model weights in 4-bit NF4; the vision towers, projector and head stay in
    `dtype` (small, and the adapters on them need real weights)."""
    if not device.startswith("cuda"):
        raise ValueError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.load_in_4bit needs bitsandbytes: pip install 'ocr-finetune[gpu]'") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    return {"quantization_config": config, "device_map": {"": device}}


def adapter_params(params: Params, adapter_dir: str | Path) -> Params:
    """params with the family, base and resolution an adapter was trained with: train and infer must agree on
    them, or the adapter sees other inputs (or another model). Says so when params.yaml differs."""
    info = read_run_info(adapter_dir)
    keys = ("family", "base", "resolution")
    trained = {k: info.get(k, getattr(params.model, k)) for k in keys}
    if not info or all(trained[k] == getattr(params.model, k) for k in keys):
        return params
    print(f"note: {adapter_dir} was trained on " + ", ".join(f"model.{k}={v}" for k, v in trained.items())
          + "; using those, not params.yaml's", flush=True)
    return params.with_model(**trained)


def read_run_info(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
