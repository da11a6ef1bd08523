"""What LoRA would train: targeted modules and trainable parameters per mode."""

from __future__ import annotations

import torch

from .loading import checkpoint_path
from .lora import attach_lora_from_params, lora_modules, trainable_parameters
from .models import get_family
from .params import Params


def lora_summary(params: Params, mode: str) -> dict:
    family = get_family(params.model.family)
    model = family.load_model(checkpoint_path(params), torch.float32, "cpu")
    total = sum(p.numel() for p in model.parameters())
    lora = params.lora.model_copy(update={"mode": mode, "experts": params.lora.experts and mode != "vision"})
    peft_model = attach_lora_from_params(model, family, lora)
    modules = lora_modules(peft_model)
    return {"mode": mode, "modules": modules, "trainable": trainable_parameters(peft_model), "total": total}


def describe_lora(params: Params, modes=None, list_modules: bool = False) -> str:
    lines = [f"family {params.model.family}, base {params.model.base}, LoRA r={params.lora.r}"
             + (", routed experts too" if params.lora.experts else "")]
    for mode in modes or ["vision", "llm", "both"]:
        s = lora_summary(params, mode)
        lines.append(f"{mode:>6}: {len(s['modules'])} modules, {s['trainable']:,} trainable of {s['total']:,} "
                     f"({100 * s['trainable'] / s['total']:.2f}%)")
        if list_modules:
            lines += [f"          {m}" for m in s["modules"]]
    return "\n".join(lines)
