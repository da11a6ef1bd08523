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


def save_adapter(peft_model: PeftModel, out_dir: Path) -> None:
    """`save_pretrained`, with the tensors named as PEFT's own loader expects them.

    On load, PEFT (0.21, with transformers 5) renames an adapter's keys through transformers' load-time
    conversion of the base checkpoint (`model.layers.` -> `model.language_model.layers.` on DeepSeek-OCR-2),
    while `save_pretrained` writes the in-memory names: `PeftModel.from_pretrained` then renames them a
    second time (`language_model.language_model...`), places none of an `llm` adapter's tensors and only
    warns. Saved under the original checkpoint's names (that conversion reversed), the adapter loads with
    plain `PeftModel.from_pretrained` as with load_adapter; a name that would not come back is an error."""
    from safetensors.torch import save_file

    peft_model.save_pretrained(out_dir)
    weights = out_dir / ADAPTER_WEIGHTS
    saved = load_file(str(weights))
    base = peft_model.get_base_model()
    serialized = {serialized_name(base, key): value for key, value in saved.items()}
    back = to_model_names(base, peft_model.peft_config["default"], serialized)
    if set(back) != set(saved):
        wrong = sorted(set(saved) - set(back))[0]
        raise RuntimeError(f"adapter tensor {wrong}: PEFT's loader would not find it under any saved name")
    save_file(serialized, str(weights), metadata={"format": "pt"})


def serialized_name(base_model, key: str) -> str:
    """An adapter key under the base checkpoint's original names (transformers' load-time renaming reversed)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    conversions = get_model_conversion_mapping(base_model, add_legacy=False)[::-1]
    renamings = [r for r in (c.reverse_transform() for c in conversions) if isinstance(r, WeightRenaming)]
    prefix = "base_model.model."
    inner = key.removeprefix(prefix)
    return (prefix if key.startswith(prefix) else "") + apply_renamings(inner, renamings)


def to_model_names(base_model, config, saved: dict) -> dict:
    """Saved adapter tensors under the names PEFT's loader gives them (its transformers-5 key conversion)."""
    from peft.utils.transformers_weight_conversion import convert_peft_adapter_state_dict_for_transformers

    return convert_peft_adapter_state_dict_for_transformers(base_model, config, dict(saved))


def load_adapter(base_model, adapter_dir: str | Path, compute: str = "model_dtype") -> PeftModel:
    """Load a saved adapter onto a base model and check every adapter tensor landed (PEFT's loader only warns
    about tensors it could not place). Reads adapters saved by save_adapter (the original checkpoint's names,
    renamed as PEFT's loader renames them) and those saved before it (the in-memory names)."""
    adapter_dir = Path(adapter_dir)
    weights = adapter_weights(adapter_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    config.inference_mode = True
    model = get_peft_model(base_model, config)
    if compute == "model_dtype":
        compute_in_model_dtype(model)
    saved = read_adapter_tensors(weights)
    state = model.state_dict()

    def in_model(key: str) -> str:
        return key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")

    # renamings move the tensors, they do not copy them: each saved tensor is found again by identity
    converted = {id(v): k for k, v in to_model_names(model.get_base_model(), config, saved).items()}
    renamed = {}
    for key, value in saved.items():
        name = in_model(converted.get(id(value), key))
        if name not in state:
            name = in_model(key)  # saved before save_adapter: the in-memory name
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
