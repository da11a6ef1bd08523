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

import re
from pathlib import Path

from pydantic import ValidationError

from .params import Params, ParamsError, _deep_merge, apply_config, read_config
from .tracking import flatten

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
    flat = flatten(raw)
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
    return _validated(_deep_merge(params.model_dump(), update), TRAIN_KEYS, f"train config {source}")


def _validated(merged: dict, keys: dict, what: str) -> Params:
    """Params from `merged`; a validation error names each key as the seed file spells it (`keys`: seed key ->
    params key)."""
    try:
        return Params.model_validate(merged)
    except ValidationError as e:
        back = {v: k for k, v in keys.items()}
        lines = [f"  `{back.get(k, k)}`: {err['msg']}" for err in e.errors()
                 for k in [".".join(str(p) for p in err["loc"])]]
        raise ParamsError(f"invalid {what}:\n" + "\n".join(lines)) from None


def load_train_config(path: str | Path, params: Params) -> Params:
    """A train config (`train --config`): the seed's shape, or sections of params.yaml."""
    raw = read_config(path)
    if is_seed_train_config(raw):
        return seed_train_params(raw, params, str(path))
    return apply_config(raw, params, str(path))


# ---------------------------------------------------------------- the teacher config (infer --config)
#
#     type                                  teacher.kind (api | local)
#     model_type                            model.family, for type local (deepseek-ocr, deepseek-ocr2)
#     api.base_url / api.model_name         teacher.api.base_url / model_name
#     api.api_key: ${OPENAI_API_KEY}        teacher.api.api_key_env: OPENAI_API_KEY (a key itself is refused)
#     generation.temperature                teacher.api.temperature
#     generation.max_tokens                 teacher.api.max_tokens and teacher.local.max_new_tokens
#     request.timeout / max_retries / concurrent_requests   teacher.api.*
#     prompts: {task: {system, user}}       teacher.prompts (inline)
#     output.format / output.save_images    infer's --format default / keep the rendered pages

TEACHER_KEYS = {
    "type": "teacher.kind",
    "api.base_url": "teacher.api.base_url",
    "api.model_name": "teacher.api.model_name",
    "generation.temperature": "teacher.api.temperature",
    "generation.max_tokens": "teacher.api.max_tokens",
    "request.timeout": "teacher.api.timeout",
    "request.max_retries": "teacher.api.max_retries",
    "request.concurrent_requests": "teacher.api.concurrent_requests",
}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)|env:([A-Za-z_][A-Za-z0-9_]*)")


def is_seed_teacher_config(raw: dict) -> bool:
    return isinstance(raw, dict) and "teacher" not in raw and any(
        k in raw for k in ("type", "generation", "request", "prompts", "output", "model_type"))


def seed_teacher_params(raw: dict, params: Params, source: str) -> tuple[Params, dict]:
    """(params with a seed-shaped teacher config applied, its `output` section)."""
    from .models import FAMILIES

    prompts = raw.get("prompts")
    output = raw.get("output") or {}
    flat = flatten({k: v for k, v in raw.items() if k not in ("prompts", "output")})
    allowed = [*TEACHER_KEYS, "model_type", "api.api_key"]
    unknown = sorted(k for k in flat if k not in allowed)
    unknown += sorted(f"output.{k}" for k in output if k not in ("format", "save_images"))
    if unknown:
        raise ParamsError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: "
                          f"{', '.join([*allowed, 'prompts', 'output.format', 'output.save_images'])})")
    if output.get("format") not in (None, "md", "json", "jsonl"):
        raise ParamsError(f"{source}: `output.format` = {output['format']!r} (allowed values: md, json, jsonl)")
    update: dict = {}
    for seed_key, key in TEACHER_KEYS.items():
        if seed_key in flat:
            _set(update, key, flat[seed_key])
    if "generation.max_tokens" in flat:
        _set(update, "teacher.local.max_new_tokens", flat["generation.max_tokens"])
    kind = flat.get("type", params.teacher.kind)
    if kind == "local" and flat.get("model_type") in FAMILIES:  # for `api` it names the server's model: not ours
        _set(update, "model.family", flat["model_type"])
        if params.model.resolution not in SEED_PRESETS[flat["model_type"]]:
            _set(update, "model.resolution", "gundam")
    if "api.api_key" in flat:
        key = str(flat["api.api_key"] or "")
        ref = _ENV_REFERENCE.fullmatch(key.strip())
        if ref:
            _set(update, "teacher.api.api_key_env", next(g for g in ref.groups() if g))
        elif key.strip() not in ("", "EMPTY"):
            raise ParamsError(f"{source}: `api.api_key` holds a key; keys never go in files (they end up in logs "
                              "and commits). Write the name of an environment variable instead, "
                              "`api_key: ${OPENAI_API_KEY}`, and export it: `export OPENAI_API_KEY=...`")
    if prompts is not None:
        _set(update, "teacher.prompts", prompts)
    return _validated(_deep_merge(params.model_dump(), update), TEACHER_KEYS, f"teacher config {source}"), output


def load_teacher_config(path: str | Path, params: Params) -> tuple[Params, dict]:
    """A teacher config (`infer --config`): the seed's shape, or sections of params.yaml. Returns params and
    the seed's `output` section ({} for a params-shaped file)."""
    raw = read_config(path)
    if is_seed_teacher_config(raw):
        return seed_teacher_params(raw, params, str(path))
    return apply_config(raw, params, str(path)), {}
