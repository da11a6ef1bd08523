"""DeepSeek-OCR (v1) through the native `UnlimitedOcrForConditionalGeneration` (transformers >= 5.20).

No released transformers has a `deepseek_ocr` class, and the checkpoint's remote code breaks on
transformers >= 4.48. `unlimited_ocr` has v1's architecture (SAM-B + CLIP-L + the 3B MoE, a newline token per
row of image features, a view separator, 1024px global view + 640px tiles) and transformers converts v1's
weight names on load (and back on save), so `deepseek-ai/DeepSeek-OCR` and `unsloth/DeepSeek-OCR` load
natively. Two settings differ from v1 and are fixed here:
- decoding: the class keeps only the last 128 generated tokens in view (plus image and prompt); v1 attends
  to everything, so every layer is set to full attention;
- tiling: the processor allows up to 32 tiles; v1 used at most 9.
transformers 5.23 ships this image processor for torchvision only (which does not install beside the CPU
torch wheel), so `UnlimitedOcrImageProcessorPil` below is the same algorithm on the PIL backend.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    DeepseekOcr2ImageProcessorPil,
    UnlimitedOcrConfig,
    UnlimitedOcrForConditionalGeneration,
    UnlimitedOcrProcessor,
)
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import SizeDict, get_image_size

# The same tiling search as UnlimitedOcr's (that module imports torchvision at the top).
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import get_optimal_tiled_canvas

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

NAME = "deepseek-ocr"
DEFAULT_CHECKPOINT = "deepseek-ai/DeepSeek-OCR"

# v1's modes (paper, table 1). Vision tokens = q*q for a q x q feature grid; the processor adds a newline
# token per row and one separator: q*(q+1) + 1, plus (rows*10) * (cols*10 + 1) for gundam's 640px tiles.
RESOLUTIONS = {
    "tiny": {"crop_to_patches": False, "size": {"height": 512, "width": 512}},     # 64 vision tokens
    "small": {"crop_to_patches": False, "size": {"height": 640, "width": 640}},    # 100
    "base": {"crop_to_patches": False, "size": {"height": 1024, "width": 1024}},  # 256, page padded to square
    "large": {"crop_to_patches": False, "size": {"height": 1280, "width": 1280}},  # 400
    "gundam": {"crop_to_patches": True, "size": {"height": 1024, "width": 1024}, "tile_size": 640,
               "min_patches": 2, "max_patches": 9},                                # 256 + 100 per tile
}

_SAM = r"model\.vision_tower\.sam_encoder\.layers\.\d+\.(attn\.(qkv|proj)|mlp\.lin[12])"
_CLIP = r"model\.vision_tower\.vision_encoder\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])"
_LLM = r"model\.language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(shared_experts\.)?(gate|up|down)_proj)"
LORA_TARGETS = {
    "vision": rf"(?:.*\.)?(?:{_SAM}|{_CLIP})",
    "llm": rf"(?:.*\.)?(?:{_LLM})",
    "both": rf"(?:.*\.)?(?:{_SAM}|{_CLIP}|{_LLM})",
}


def lora_targets(mode: str) -> str:
    return LORA_TARGETS[mode]


class UnlimitedOcrImageProcessorPil(DeepseekOcr2ImageProcessorPil):
    """`UnlimitedOcrImageProcessor` (torchvision) on the PIL backend: same tiling, global view and outputs.

    Differences from DeepSeek-OCR-2's processor, all from the torchvision original: 640px tiles; the global
    view is `max(size)` wide whether or not pages are tiled; views of at most `maximum_pad_value` px are
    resized to a square without keeping the aspect ratio (v1's tiny/small modes), larger ones are scaled and
    padded; and `patches_grid` (columns, rows) is returned for the newline tokens of each tile row.
    """

    tile_size = 640
    max_patches = 9
    maximum_pad_value = 640
    model_input_names = ["pixel_values", "num_local_patches", "patches_grid"]
    valid_kwargs = DeepseekOcr2ImageProcessorPil.valid_kwargs

    def _preprocess(self, images, size: SizeDict, resample, do_rescale: bool, rescale_factor: float,
                    do_normalize: bool, image_mean, image_std, return_tensors, crop_to_patches: bool = True,
                    min_patches: int = 2, max_patches: int = 9, tile_size: int = 640, background_color=None,
                    **kwargs) -> BatchFeature:
        background_color = background_color or self.background_color
        maximum_pad_value = self.maximum_pad_value

        def finish(x):
            x = self.rescale(x, rescale_factor) if do_rescale else x
            return self.normalize(x, image_mean, image_std) if do_normalize else x

        local, global_views, num_local, grids = [], [], [], []
        for image in images:
            height, width = get_image_size(image)
            if crop_to_patches and max(height, width) > tile_size:
                columns, rows = get_optimal_tiled_canvas((height, width), (tile_size, tile_size), min_patches,
                                                         max_patches)
                patches = self.crop_image_to_patches(image, min_patches, max_patches, tile_size, resample)
                local += [finish(p) for p in patches]
                num_local.append(len(patches))
            else:
                columns, rows = 1, 1
                num_local.append(0)
            grids.append([columns, rows])
            target = max(size.height, size.width)
            if not crop_to_patches and target <= maximum_pad_value:
                view = self.resize(image, SizeDict(height=target, width=target), resample=resample)
            else:
                view = _deepseek.official_global_view(self, image, target, background_color, resample)
            global_views.append(finish(view))
        data = {"pixel_values": global_views, "num_local_patches": num_local, "patches_grid": grids}
        if local:
            data["pixel_values_local"] = local
        return BatchFeature(data=data, tensor_type=return_tensors, skip_tensor_conversion=["num_local_patches",
                                                                                             "patches_grid"])


# ---------------------------------------------------------------- random models, built offline

def _text(tokenizer, **sizes) -> dict:
    # v1 attends to every earlier token; the class's default "reference sliding" window drops generated
    # tokens older than 128 from view, which changes long transcriptions.
    n = sizes.get("num_hidden_layers", 12)
    return dict(layer_types=["full_attention"] * n, **sizes, **_deepseek.special_ids(tokenizer))


def tiny_config(tokenizer) -> UnlimitedOcrConfig:
    return UnlimitedOcrConfig(
        vision_config=dict(
            sam_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, global_attn_indexes=[1],
                            window_size=8, output_channels=32, downsample_channels=[32, 64], mlp_dim=64,
                            initializer_range=0.02),
            encoder_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)),
        text_config=_text(tokenizer, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                          mlp_layer_types=["dense", "sparse"], max_position_embeddings=4096,
                          initializer_range=0.1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def full_config(tokenizer) -> UnlimitedOcrConfig:
    """v1's sizes are the class defaults (SAM-B, CLIP-L, the 3B MoE): 3.34 B parameters."""
    return UnlimitedOcrConfig(text_config=_text(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def build_random(out_dir: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Path:
    """A random checkpoint, saved as transformers saves this class: under v1's original weight names
    (`model.sam_model.blocks...`, fused CLIP `qkv_proj`, one tensor per expert), like the hub checkpoints."""
    tokenizer = _deepseek.tiny_tokenizer()
    config = tiny_config(tokenizer) if size == "tiny" else full_config(tokenizer)
    processor = UnlimitedOcrProcessor(image_processor=UnlimitedOcrImageProcessorPil(), tokenizer=tokenizer)
    marker = {"version": _deepseek.TINY_VERSION, "seed": seed, "family": NAME, "size": size}
    return _deepseek.save_random(UnlimitedOcrForConditionalGeneration, config, processor, Path(out_dir), marker,
                                 device, dtype, seed)


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    return build_random(out_dir, "tiny", seed)


# ---------------------------------------------------------------- loading

def checkpoint_dir(base: str, cache_dir: str | Path, allow_download: bool = True) -> Path:
    return _deepseek.checkpoint_dir(base, cache_dir, allow_download, "tiny-deepseek-ocr", build_tiny,
                                    "about 6.7 GB")


def load_processor(path: str | Path, resolution: str) -> UnlimitedOcrProcessor:
    tokenizer = _deepseek.load_tokenizer(path)
    preset = RESOLUTIONS[resolution]
    image_processor = UnlimitedOcrImageProcessorPil(**preset)
    return _deepseek.with_preset(UnlimitedOcrProcessor(image_processor=image_processor, tokenizer=tokenizer),
                                 RESOLUTIONS[resolution])


def load_config(path: str | Path) -> UnlimitedOcrConfig:
    config = UnlimitedOcrConfig.from_pretrained(path)
    config.text_config.layer_types = ["full_attention"] * config.text_config.num_hidden_layers
    return config


def load_model(path: str | Path, dtype: torch.dtype, device: str, **kwargs):
    try:
        model = UnlimitedOcrForConditionalGeneration.from_pretrained(path, config=load_config(path), dtype=dtype,
                                                                     **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a DeepSeek-OCR checkpoint from {path}: {e}") from None
    return model if "device_map" in kwargs else model.to(device)
