"""DeepSeek-OCR-2 through the native transformers classes (`DeepseekOcr2ForConditionalGeneration`).

No remote code: transformers >= 5.10 ships the model, and the PIL image processor runs without torchvision.
`model.base: tiny` builds a small random model with a tokenizer made in code, saved like a real checkpoint,
so everything runs offline on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    DeepseekOcr2Config,
    DeepseekOcr2ForConditionalGeneration,
    DeepseekOcr2ImageProcessorPil,
    DeepseekOcr2Processor,
)

from .base import Encoded, ModelLoadError, resolve_checkpoint, write_json

NAME = "deepseek-ocr2"
DEFAULT_CHECKPOINT = "deepseek-community/DeepSeek-OCR-2"
BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
TINY_VERSION = 1  # bump when the tiny architecture or tokenizer changes, so cached copies are rebuilt

# Resolution presets (issue 3 adds the rest): token counts are 256 + 144 * tiles + 1 for OCR-2.
RESOLUTIONS = {
    # One 768px view, no tiles: 145 image tokens. The processor would count a 1024 global view (257 tokens)
    # unless `size` is 768 too, so both are set together.
    "nocrop": {"crop_to_patches": False, "size": {"height": 768, "width": 768}},
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


# ---------------------------------------------------------------- tiny model, built offline

def _tiny_tokenizer():
    """A byte-level BPE trained in code on fixed text: covers every string, downloads nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..samples import DOCUMENTS, pages_markdown

    corpus = [md for spec in DOCUMENTS.values() for md in pages_markdown(spec["blocks"])]
    corpus += ["Convert the document to markdown.", "| --- | --- |", "0123456789 .,;:!?()[]{}#*-+=/%&@"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, "<image>", "<|User|>", "<|Assistant|>", "<|grounding|>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=4096)


def tiny_config(tokenizer) -> DeepseekOcr2Config:
    """The real architecture at toy sizes. SAM's own init range (1e-10) would give every page the same
    features, so the tiny model uses 0.02 throughout: random, but images stay distinguishable."""
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
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.1),
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
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )


def build_random(out_dir: str | Path, size: str = "tiny", seed: int = 0, device: str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write a random DeepSeek-OCR-2 checkpoint (model, tokenizer, processor) to out_dir.

    size `tiny`: toy sizes for CPU tests; `full`: the real shapes (benchmarks on a GPU; about 6.8 GB in bf16).
    """
    out_dir = Path(out_dir)
    marker = out_dir / "tiny.json"
    if marker.is_file() and json.loads(marker.read_text()) == {"version": TINY_VERSION, "seed": seed,
                                                                 "family": NAME, "size": size}:
        return out_dir
    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(tokenizer) if size == "tiny" else full_config(tokenizer)
    with torch.device(device):
        model = DeepseekOcr2ForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor = DeepseekOcr2Processor(image_processor=DeepseekOcr2ImageProcessorPil(), tokenizer=tokenizer)
    processor.save_pretrained(out_dir)
    write_json(marker, {"version": TINY_VERSION, "seed": seed, "family": NAME, "size": size})
    return out_dir


def build_tiny(out_dir: str | Path, seed: int = 0) -> Path:
    return build_random(out_dir, "tiny", seed)


# ---------------------------------------------------------------- loading

def checkpoint_dir(base: str, cache_dir: str | Path, allow_download: bool = True) -> Path:
    if base == "tiny":
        return build_tiny(Path(cache_dir) / "tiny")
    return resolve_checkpoint(base, cache_dir, allow_download, size_hint="about 6.8 GB")


def load_processor(path: str | Path, resolution: str) -> DeepseekOcr2Processor:
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = DeepseekOcr2ImageProcessorPil.from_pretrained(path, **RESOLUTIONS[resolution])
    return DeepseekOcr2Processor(image_processor=image_processor, tokenizer=tokenizer)


def load_model(path: str | Path, dtype: torch.dtype, device: str):
    try:
        model = DeepseekOcr2ForConditionalGeneration.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a DeepSeek-OCR-2 checkpoint from {path}: {e}") from None
    return model.to(device)


# ---------------------------------------------------------------- inputs

def encode_prompt(processor, image, prompt: str) -> dict:
    """Tokenise BOS + prompt with the image's placeholder tokens expanded; returns processor tensors (batch 1)."""
    tok = processor.tokenizer
    return processor(images=[image], text=[tok.bos_token + prompt], add_special_tokens=False, return_tensors="pt")


def encode_example(processor, image, prompt: str, target: str, max_label_tokens: int) -> Encoded:
    enc = encode_prompt(processor, image, prompt)
    tok = processor.tokenizer
    prompt_ids = enc["input_ids"][0]
    target_ids = tok(target, add_special_tokens=False)["input_ids"][: max_label_tokens - 1] + [tok.eos_token_id]
    target_ids = torch.tensor(target_ids, dtype=prompt_ids.dtype)
    # The loss sees only the target: BOS, prompt text and every image token are masked.
    labels = torch.cat([torch.full_like(prompt_ids, -100), target_ids])
    return Encoded(input_ids=torch.cat([prompt_ids, target_ids]), labels=labels, pixel=_pixel(enc))


def _pixel(enc) -> dict:
    out = {"pixel_values": enc["pixel_values"], "num_local_patches": enc["num_local_patches"].tolist()}
    if "pixel_values_local" in enc:
        out["pixel_values_local"] = enc["pixel_values_local"]
    return out


def collate_pixels(pixels: list[dict]) -> dict:
    """Batch per-example image tensors; pages may have different numbers of tiles."""
    batch = {"pixel_values": torch.cat([p["pixel_values"] for p in pixels]),
             "num_local_patches": [n for p in pixels for n in p["num_local_patches"]]}
    local = [p["pixel_values_local"] for p in pixels if "pixel_values_local" in p]
    if local:
        batch["pixel_values_local"] = torch.cat(local)
    return batch


def generation_inputs(processor, images, prompt: str) -> tuple[dict, int]:
    """Left-padded batch of prompts for generate(); returns (inputs, prompt length)."""
    encs = [encode_prompt(processor, im, prompt) for im in images]
    pad = processor.tokenizer.pad_token_id
    width = max(e["input_ids"].shape[1] for e in encs)
    ids = torch.full((len(encs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encs), width), dtype=torch.long)
    for i, e in enumerate(encs):
        n = e["input_ids"].shape[1]
        ids[i, width - n:] = e["input_ids"][0]
        mask[i, width - n:] = 1
    return {"input_ids": ids, "attention_mask": mask, **collate_pixels([_pixel(e) for e in encs])}, width
