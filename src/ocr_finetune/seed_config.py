"""The seed README's config files (`config/train_config.yaml`, `config/teacher_api.yaml`), in its shapes,
mapped onto params. Users copied those files verbatim; their keys are the contract.

    train config                                   params
    model.base_model_path                          model.base (and model.family: DeepSeek-OCR unless the
                                                   path names OCR-2)
    model.load_in_4bit                             model.load_in_4bit
    model.use_gradient_checkpointing               train.gradient_checkpointing ("unsloth" = true)
    lora.r / lora_alpha / lora_dropout             lora.r / alpha / dropout
    lora.vision_target_modules / llm_target_modules  lora.vision_modules / llm_modules (module names)
    training.per_device_train_batch_size           train.batch_size (x train.num_gpus)
    training.gradient_accumulation_steps           train.grad_accum
    training.learning_rate / max_steps             train.learning_rate / max_steps
    training.logging_steps / save_steps            train.log_every / save_every
    image.{image_size, base_size, crop_mode}       model.resolution (the preset with these sizes)

An error names the key as the file spells it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import ValidationError

from .params import Params, ParamsError, _deep_merge

# (image_size, base_size, crop_mode) of each family's presets, in the seed's terms
SEED_PRESETS = {
    "deepseek-ocr": {"tiny": (512, 512, False), "small": (640, 640, False), "base": (1024, 1024, False),
                     "large": (1280, 1280, False), "gundam": (640, 1024, True)},
    "deepseek-ocr2": {"nocrop": (768, 768, False), "gundam": (768, 1024, True)},
}

TRAIN_KEYS = {  # seed key -> params key
    "model.base_model_path": "model.base",
    "model.load_in_4bit": "model.load_in_4bit",
    "model.use_gradient_checkpointing": "train.gradient_checkpointing",
    "lora.r": "lora.r",
    "lora.lora_alpha": "lora.alpha",
    "lora.lora_dropout": "lora.dropout",
    "lora.vision_target_modules": "lora.vision_modules",
    "lora.llm_target_modules": "lora.llm_modules",
    "training.per_device_train_batch_size": "train.batch_size",
    "training.gradient_accumulation_steps": "train.grad_accum",
    "training.learning_rate": "train.learning_rate",
    "training.max_steps": "train.max_steps",
    "training.logging_steps": "train.log_every",
    "training.save_steps": "train.save_every",
}
IMAGE_KEYS = ("image.image_size", "image.base_size", "image.crop_mode")


def is_seed_train_config(raw: dict) -> bool:
    return isinstance(raw, dict) and ("training" in raw or "image" in raw or
                                      "base_model_path" in (raw.get("model") or {}))


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *sections, name = dotted.split(".")
    for s in sections:
        tree = tree.setdefault(s, {})
    tree[name] = value


def family_of(base: str) -> str:
    name = str(base).lower().replace("_", "-")
    return "deepseek-ocr2" if "ocr-2" in name or "ocr2" in name else "deepseek-ocr"


def seed_train_params(raw: dict, params: Params, source: str) -> Params:
    """params with a seed-shaped train config applied."""
    flat = _flatten(raw)
    unknown = sorted(k for k in flat if k not in TRAIN_KEYS and k not in IMAGE_KEYS)
    if unknown:
        raise ParamsError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join([*TRAIN_KEYS, *IMAGE_KEYS])})")
    update: dict = {}
    for seed_key, key in TRAIN_KEYS.items():
        if seed_key in flat:
            value = flat[seed_key]
            if seed_key == "model.use_gradient_checkpointing" and value == "unsloth":
                value = True  # Unsloth's offloaded checkpointing: plain checkpointing here
            _set(update, key, value)
    if "training.per_device_train_batch_size" in flat and isinstance(flat["training.per_device_train_batch_size"], int):
        update["train"]["batch_size"] = flat["training.per_device_train_batch_size"] * params.train.num_gpus
    base = flat.get("model.base_model_path", params.model.base)
    family = family_of(base) if "model.base_model_path" in flat else params.model.family
    update.setdefault("model", {})["family"] = family
    if any(k in flat for k in IMAGE_KEYS):
        presets = SEED_PRESETS[family]
        current = presets.get(params.model.resolution, next(iter(presets.values())))
        wanted = tuple(flat.get(k, current[i]) for i, k in enumerate(IMAGE_KEYS))
        match = [name for name, sizes in presets.items() if sizes == wanted]
        if not match:
            listing = "; ".join(f"{n.capitalize()}: image_size {s[0]}, base_size {s[1]}, crop_mode {s[2]}"
                                for n, s in presets.items())
            raise ParamsError(f"{source}: image (image_size {wanted[0]}, base_size {wanted[1]}, crop_mode "
                              f"{wanted[2]}) is not a preset of {family} (allowed presets: {listing})")
        update["model"]["resolution"] = match[0]
    elif "model.base_model_path" in flat and params.model.resolution not in SEED_PRESETS[family]:
        update["model"]["resolution"] = "gundam"
    merged = _deep_merge(params.model_dump(), update)
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        back = {v: k for k, v in TRAIN_KEYS.items()}
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  `{back.get(key, key)}`: {err['msg']}")
        raise ParamsError(f"invalid train config {source}:\n" + "\n".join(lines)) from None


def load_train_config(path: str | Path, params: Params) -> Params:
    """A train config (`train --config`): the seed's shape, or sections of params.yaml."""
    from .params import load_config

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if is_seed_train_config(raw):
        return seed_train_params(raw, params, str(path))
    return load_config(path, params)
