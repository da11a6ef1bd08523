"""DeepSeek-OCR-2 through the native transformers classes (`DeepseekOcr2ForConditionalGeneration`).

No remote code: transformers >= 5.10 ships the model, and the PIL image processor runs without torchvision.
`model.base: tiny` builds a small random model with a tokenizer made in code, saved like a real checkpoint,
so everything runs offline on a CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DeepseekOcr2Config,
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2ImageProcessorPil,
    DeepseekOcr2Processor,
)
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict, get_image_size

from . import _deepseek
from ._deepseek import (  # noqa: F401
    EXPERT_PARAMETERS,
    chunk_vision_tower,
    collate_pixels,
    collate_prompts,
    encode_example,
    encode_text,
    generation_inputs,
    prompt_inputs,
    use_fused_sam_attention,
)
from .base import ModelLoadError

NAME = "deepseek-ocr2"
DEFAULT_CHECKPOINT = "deepseek-community/DeepSeek-OCR-2"

# Image views per page. Token counts: 256 (1024px global view) + 144 per 768px tile + 1 separator.
class OfficialImageProcessorPil(DeepseekOcr2ImageProcessorPil):
    """transformers' DeepSeek-OCR-2 processor (tiles, mean/std, outputs unchanged) with the global view the
    official inference code gives the model: padded as `ImageOps.pad` pads (round, not floor, for the
    margin), and without tiles (`nocrop`) the page stretched to one square view, as the official non-crop
    input is, where transformers pads it."""

    def _preprocess(self, images, size: SizeDict, resample, do_rescale: bool, rescale_factor: float,
                    do_normalize: bool, image_mean, image_std, return_tensors, crop_to_patches: bool = True,
                    min_patches: int = 2, max_patches: int = 6, tile_size: int = 768, background_color=None,
                    **kwargs) -> BatchFeature:
        background_color = background_color or self.background_color

        def finish(x):
            x = self.rescale(x, rescale_factor) if do_rescale else x
            return self.normalize(x, image_mean, image_std) if do_normalize else x

        local, global_views, num_local = [], [], []
        for image in images:
            height, width = get_image_size(image)
            if crop_to_patches and max(height, width) > tile_size:
                patches = self.crop_image_to_patches(image, min_patches=min_patches, max_patches=max_patches,
                                                     tile_size=tile_size, resample=resample)
                local += [finish(p) for p in patches]
                num_local.append(len(patches))
            else:
                num_local.append(0)
            if crop_to_patches:
                view = _deepseek.official_global_view(self, image, size.height, background_color, resample)
            else:
                view = self.resize(image, SizeDict(height=tile_size, width=tile_size), resample=resample)
            global_views.append(finish(view))
        data = {"pixel_values": global_views, "num_local_patches": num_local}
        if local:
            data["pixel_values_local"] = local
        return BatchFeature(data=data, tensor_type=return_tensors)


RESOLUTIONS = {
    # One 768px view, no tiles: 145 image tokens. The processor would count a 1024 global view (257 tokens)
    # unless `size` is 768 too, so both are set together.
    # The page stretched to the square (the official non-crop input), not padded.
    "nocrop": {"crop_to_patches": False, "size": {"height": 768, "width": 768}},
    # 1024px global view + 2..6 tiles of 768px for pages larger than one tile (0 tiles otherwise).
    "gundam": {"crop_to_patches": True, "size": {"height": 1024, "width": 1024}, "min_patches": 2,
               "max_patches": 6},
}

# LoRA targets as regexes over full module paths, scoped to one tower each: a bare name such as `proj`
# would also hit `sam_encoder.proj` (a conv container PEFT rejects) or the other tower's layers.
_SAM = r"model\.vision_tower\.sam_encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.lin[12])"
_ENCODER = r"model\.vision_tower\.vision_encoder\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)"
_LLM = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)"
LORA_TARGETS = {
    "vision": rf"(?:.*\.)?(?:{_SAM}|{_ENCODER})",
    "llm": rf"(?:.*\.)?(?:{_LLM})",
    "both": rf"(?:.*\.)?(?:{_SAM}|{_ENCODER}|{_LLM})",
}


def lora_targets(mode: str) -> str:
    return LORA_TARGETS[mode]


# ---------------------------------------------------------------- random models, built offline

def tiny_config(tokenizer) -> DeepseekOcr2Config:
    """The real architecture at toy sizes. SAM's own init range (1e-10) would give every page the same
    features, so the tiny model uses 0.02 throughout: random, but images stay distinguishable (and
    `sharpen_tiny_encoder` scales the second encoder's first layer, so that they stay so in the features)."""
    return DeepseekOcr2Config(
        vision_config=dict(
            sam_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                            window_size=8, output_channels=32, downsample_channels=[32, 48], mlp_dim=64,
                            image_size=768, initializer_range=0.02),
            encoder_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=1, max_position_embeddings=1024)),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                         num_experts_per_tok=2, n_shared_experts=1, mlp_layer_types=["dense", "sparse"],
                         max_position_embeddings=4096, initializer_range=0.1, **_deepseek.special_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def full_config(tokenizer) -> DeepseekOcr2Config:
    """DeepSeek-OCR-2's published sizes (3.39 B parameters) with this tokenizer's special-token ids: random
    weights of the real shapes, for speed and memory benchmarks without a download."""
    return DeepseekOcr2Config(
        vision_config=dict(  # SAM ViT-B is the config default; the encoder is Qwen2-0.5B sized
            encoder_config=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                num_attention_heads=14, num_key_value_heads=2, vocab_size=1,
                                max_position_embeddings=32768, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1000000.0})),
        text_config=dict(vocab_size=129280, hidden_size=1280, intermediate_size=6848, moe_intermediate_size=896,
                         num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=10, head_dim=128,
                         n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                         mlp_layer_types=["dense"] + ["sparse"] * 11, max_position_embeddings=8192,
                         **_deepseek.special_ids(tokenizer)),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


TINY_ENCODER_SHARPENING = 12.5


def sharpen_tiny_encoder(model) -> None:
    """The tiny model's second encoder, first layer: weights 12.5x their init (std 0.25, not 0.02).

    At 0.02 the attention logits of the 144 learned queries over the page's patches are ~0.02: every query
    reads the plain mean of the patches, and pages 20% apart in SAM's output came out 2% apart in the image
    features. The demo's model then told its pages apart by logit margins of 0.04 to 0.4, and which pages it
    read back changed with the thread count (seen-page CER 0.0 or 0.45). With the first layer at 0.25 the
    queries attend to patches of their own: features 10% apart, and the demo reads all five pages back with
    margins above 2 (seeds 0-2, 1 or 2 threads). Only the first layer, and not more: both layers at 0.2, or
    the first at 0.3, multiply float rounding past the float32 tolerances of the parity tests in
    tests/test_model_families.py (fused SAM attention, compiled layers)."""
    for module in model.model.vision_tower.vision_encoder.layers[0].modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.mul_(TINY_ENCODER_SHARPENING)


def build_random(out_dir: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Path:
    """A random checkpoint: `tiny` for CPU tests, `full` (the real shapes, ~6.8 GB in bf16) for GPU benchmarks."""
    tokenizer = _deepseek.tiny_tokenizer()
    config = tiny_config(tokenizer) if size == "tiny" else full_config(tokenizer)
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer)
    marker = {"version": _deepseek.TINY_VERSION, "seed": seed, "family": NAME, "size": size}
    return _deepseek.save_random(DeepseekOcr2ForConditionalGeneration, config, processor, Path(out_dir), marker,
                                 device, dtype, seed, adjust=sharpen_tiny_encoder if size == "tiny" else None)


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    return build_random(out_dir, "tiny", seed)


# ---------------------------------------------------------------- loading

def checkpoint_dir(base: str, cache_dir: str | Path, allow_download: bool = True) -> Path:
    return _deepseek.checkpoint_dir(base, cache_dir, allow_download, "tiny", build_tiny, "about 6.8 GB")


NATIVE_CHECKPOINT = "deepseek-community/DeepSeek-OCR-2"


def check_layout(path: str | Path) -> None:
    """The original `deepseek-ai/DeepSeek-OCR-2` repository is written for its own remote code (model type
    `deepseek_vl_v2`, no preprocessor_config.json) and the native class cannot read it: say which checkpoint
    to use instead of failing on a missing file."""
    import json

    config = Path(path) / "config.json"
    raw = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    if raw and (raw.get("model_type") != "deepseek_ocr2" or "auto_map" in raw):
        raise ModelLoadError(
            f"{path} is a checkpoint for DeepSeek's own remote code (model_type {raw.get('model_type')!r}"
            f"{', auto_map' if 'auto_map' in raw else ''}), the layout of the original deepseek-ai/DeepSeek-OCR-2 "
            f"repository; this project loads the native transformers conversion without remote code: set "
            f"model.base={NATIVE_CHECKPOINT} (the same weights)")


def load_processor(path: str | Path, resolution: str) -> DeepseekOcr2Processor:
    check_layout(path)
    tokenizer = _deepseek.load_tokenizer(path)
    image_processor = OfficialImageProcessorPil.from_pretrained(path, **RESOLUTIONS[resolution])
    return _deepseek.with_preset(DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer),
                                 RESOLUTIONS[resolution])


def load_model(path: str | Path, dtype: torch.dtype, device: str, **kwargs):
    check_layout(path)
    try:
        model = DeepseekOcr2ForConditionalGeneration.from_pretrained(path, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a DeepSeek-OCR-2 checkpoint from {path}: {e}") from None
    return model if "device_map" in kwargs else model.to(device)
