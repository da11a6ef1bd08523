"""LoRA through PEFT: attach to the modules a mode selects, save, and reload exactly."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from safetensors.torch import load_file

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def attach_lora(model, targets: str, r: int, alpha: int, dropout: float,
                target_parameters: list[str] | None = None, compute: str = "model_dtype") -> PeftModel:
    """LoRA on the modules whose full path matches `targets`, and on parameters (the fused routed experts,
    which are 3-D tensors, not nn.Linear) named in `target_parameters`. compute: see compute_in_model_dtype."""
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                        target_parameters=target_parameters or None)
    model = get_peft_model(model, config)
    if compute == "model_dtype":
        compute_in_model_dtype(model)
    return model


def restrict_targets(targets: str, vision_modules: list[str] | None, llm_modules: list[str] | None) -> str:
    """`targets` (a regex over full module paths) narrowed to the given module names in each tower (None: no
    narrowing there), as a lookahead in front of it: PEFT fullmatches the one regex."""
    if vision_modules is None and llm_modules is None:
        return targets

    def tower(marker: str, names: list[str] | None) -> str:
        if names is None:
            return rf".*\.{marker}\..*"
        if not names:
            return "(?!)"
        return rf".*\.{marker}\..*\.(?:{'|'.join(re.escape(n) for n in names)})"

    return rf"(?=(?:{tower('vision_tower', vision_modules)}|{tower('language_model', llm_modules)})$){targets}"


def attach_lora_from_params(model, family, lora) -> PeftModel:
    """attach_lora as `params.lora` asks (mode, rank, alpha, dropout, experts, compute, module names) for this
    family."""
    targets = restrict_targets(family.lora_targets(lora.mode), lora.vision_modules, lora.llm_modules)
    return attach_lora(model, targets, lora.r, lora.alpha, lora.dropout,
                       family.EXPERT_PARAMETERS if lora.experts else None, lora.compute)


class _InputDtypeLinear(torch.nn.Linear):
    """A LoRA A or B matrix kept in float32 (for the optimizer) but applied in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)


def compute_in_model_dtype(model) -> None:
    """Run the LoRA branches in the activations' dtype (bf16 on GPU), as autocast would; weights, gradients
    and optimizer state stay float32.

    PEFT keeps adapter weights in float32 and casts every adapted layer's input to float32: on a bf16 model
    that is a float32 copy of each input, float32 matmuls and a float32 sum per layer. On full-size
    DeepSeek-OCR-2 (H200) it made the vision towers' forward three times slower with LoRA on them than
    without (benchmarks/results/profile_*.json). Here the small A and B matrices are cast instead (r x d, not
    tokens x d); the cast is differentiable, so their gradients arrive in float32. A no-op on a float32 model.
    """
    for module in model.modules():
        if isinstance(module, LoraLinear):  # not the experts' ParamWrapper: it applies A and B as weights
            module.cast_input_dtype_enabled = False
            for factors in (module.lora_A, module.lora_B):
                for linear in factors.values():
                    if type(linear) is torch.nn.Linear:
                        linear.__class__ = _InputDtypeLinear


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


def adapter_weights(adapter_dir: Path) -> Path:
    """The adapter's weight file, or a one-line error saying what is missing."""
    for name in (ADAPTER_WEIGHTS, "adapter_config.json"):
        if not (adapter_dir / name).is_file():
            raise FileNotFoundError(f"no adapter in {adapter_dir} ({name} missing): run `train` first")
    return adapter_dir / ADAPTER_WEIGHTS


def read_adapter_tensors(weights: Path) -> dict:
    try:
        return load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError for a damaged file
        raise ValueError(f"{weights} cannot be read ({type(e).__name__}: {e}); train again or restore it") from None


def load_adapter(base_model, adapter_dir: str | Path, compute: str = "model_dtype") -> PeftModel:
    """Load a saved adapter onto a base model and check every adapter tensor landed.

    `PeftModel.from_pretrained` is not used: with transformers 5.23 + PEFT 0.21 it renames language-model
    keys on DeepSeek-OCR-2 (`language_model.language_model.layers...`), warns, and leaves an `llm` adapter at
    zero, so the "fine-tuned" model silently equals the base. Rebuilding the PEFT model from the saved config
    and loading the tensors under their in-memory names is exact, and missing keys are an error here.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_weights(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = True
    model = get_peft_model(base_model, config)
    if compute == "model_dtype":
        compute_in_model_dtype(model)
    saved = read_adapter_tensors(weights)
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
