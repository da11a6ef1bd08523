"""LoRA through PEFT: attach to the modules a mode selects, save, and reload exactly."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach_lora(model, targets: str, r: int, alpha: int, dropout: float,
                target_parameters: list[str] | None = None) -> PeftModel:
    """LoRA on the modules whose full path matches `targets`, and on parameters (the fused routed experts,
    which are 3-D tensors, not nn.Linear) named in `target_parameters`."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        target_parameters=target_parameters or None)
    return get_peft_model(model, config)


def attach_lora_from_params(model, family, lora) -> PeftModel:
    """attach_lora as `params.lora` asks (mode, rank, alpha, dropout, experts) for this family."""
    return attach_lora(model, family.lora_targets(lora.mode), lora.r, lora.alpha, lora.dropout,
                       family.EXPERT_PARAMETERS if lora.experts else None)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model) -> list[str]:
    """Names of the modules (and adapted parameters, for the experts) that carry a LoRA adapter."""
    names = []
    for name, m in model.named_modules():
        if hasattr(m, "lora_A") and len(m.lora_A) > 0:
            parameter = getattr(m, "parameter_name", None)  # ParamWrapper: LoRA on a parameter, not a Linear
            names.append(f"{name}[{parameter}]" if parameter else name)
    return names


def load_adapter(base_model, adapter_dir: str | Path) -> PeftModel:
    """Load a saved adapter onto a base model and check every adapter tensor landed.

    `PeftModel.from_pretrained` is not used: with transformers 5.23 + PEFT 0.21 it renames language-model
    keys on DeepSeek-OCR-2 (`language_model.language_model.layers...`), warns, and leaves an `llm` adapter at
    zero, so the "fine-tuned" model silently equals the base. Rebuilding the PEFT model from the saved config
    and loading the tensors under their in-memory names is exact, and missing keys are an error here.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no adapter in {adapter_dir} ({ADAPTER_WEIGHTS} missing): run `train` first")
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = True
    model = get_peft_model(base_model, config)
    saved = load_file(str(weights))
    state = model.state_dict()
    renamed = {}
    for key, value in saved.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        if name not in state:
            raise RuntimeError(f"adapter tensor {key} has no place in the model (is it for another base model?)")
        renamed[name] = value.to(state[name].dtype)
    expected = {k for k in state if ".lora_" in k}
    missing = expected - set(renamed)
    if missing:
        raise RuntimeError(f"adapter in {adapter_dir} lacks {len(missing)} LoRA tensors, e.g. {sorted(missing)[0]}")
    result = model.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    model.eval()
    return model


def freeze(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
