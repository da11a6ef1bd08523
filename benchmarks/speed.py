"""Training and decoding speed of full-size DeepSeek-OCR-2 (random weights) on one GPU, baseline vs levers.

Every lever is measured next to the plain baseline in the same process, on the same pages:
  train:  pages/s (steady, after 3 warm-up steps) and peak GiB per LoRA mode and batch size, through the
          product's own `train()` loop (plain transformers + PEFT);
  decode: ms/token at batch 1 (decode steps only: a prefill-only run is subtracted) and tokens/s at larger
          batches for a fixed output length (EOS suppressed), through `generate()`.
Levers so far: decode `no_cudnn_sdpa` (the profiler showed cuDNN's SDPA planning anew for every KV length),
`static_cache` (+ torch.compile of the decode step, as transformers does for a static cache); train, cumulative:
`logits_on_targets` (the LM head and loss over target positions only), `lora_in_model_dtype` (LoRA branches in
bf16, weights float32), `fused_sam_attention` (SAM's relative-position bias folded into q and k, so SDPA runs
flash kernels), compiled layers, the chunked loss, `cudnn_sam_attention` (cuDNN with a shorter v in SAM),
`vision_feature_cache` (llm mode: each page's image features computed once); memory levers `vision_passes_*`.
Decode `adaptive_experts` (models.moe), `defaults` (what `infer` does on CUDA) and
`defaults+dense_from_batch_1` (the experts' switch point moved: every expert on every token from batch 1).

    python benchmarks/speed.py --out results_dir [--part train decode] [--commit SHA]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from pathlib import Path

import torch

from common import environment, speed_setup, train_config

from ocr_finetune.dataset import read_jsonl
from ocr_finetune.models import get_family
from ocr_finetune.models.base import load_image
from ocr_finetune.models import moe
from ocr_finetune.models.moe import use_adaptive_experts
from ocr_finetune.params import ModelParams, validate_params
from ocr_finetune.data import to_device
from ocr_finetune.train import train


# Cumulative: each lever adds to the ones above it; the last line of a mode is the product's default.
NO_CACHE = {"cache_vision_features": False}
# adaptive_experts changes nothing in training (thousands of tokens per step take grouped_mm either way)
# the vision tower over every image of the batch at once; SAM's fused attention on flash kernels
FLASH = {"vision_batch": 0, "sam_attention_kernel": "flash"}
PLAIN_MODEL = {"fused_sam_attention": False, "adaptive_experts": False, **FLASH}
EAGER = {**NO_CACHE, "compile": "none", "loss_chunk": 0}
TRAIN_LEVERS = {
    "baseline": {"train": {**EAGER, "logits_on_targets": False}, "lora": {"compute": "float32"},
                 "model": PLAIN_MODEL},
    "+logits_on_targets": {"train": EAGER, "lora": {"compute": "float32"}, "model": PLAIN_MODEL},
    "+lora_in_model_dtype": {"train": EAGER, "lora": {}, "model": PLAIN_MODEL},
    "+fused_sam_attention": {"train": EAGER, "lora": {}, "model": FLASH},
    "+compiled_vision_layers": {"train": {**EAGER, "compile": "vision"}, "lora": {}, "model": FLASH},
    "+compiled_all_layers": {"train": {**EAGER, "compile": "all"}, "lora": {}, "model": FLASH},
    "+chunked_loss": {"train": {**NO_CACHE, "compile": "all"}, "lora": {}, "model": FLASH},
    # the defaults of modes vision and both: a shorter v in SAM's attention
    "+cudnn_sam_attention": {"train": {**NO_CACHE, "compile": "all"}, "lora": {}, "model": {}},
    # memory levers on top of the defaults, not cumulative: the tower over 16 or 48 images at a time
    "vision_passes_16": {"train": {**NO_CACHE, "compile": "all"}, "lora": {}, "model": {"vision_batch": 16}},
    "vision_passes_48": {"train": {**NO_CACHE, "compile": "all"}, "lora": {}, "model": {"vision_batch": 48}},
    # llm only: the frozen towers run once per page
    "+vision_feature_cache": {"train": {"compile": "none", "loss_chunk": 0}, "lora": {}, "model": {}},
    "+vision_feature_cache+compiled_all_layers": {"train": {"compile": "all", "loss_chunk": 0}, "lora": {},
                                                  "model": {}},
    # the defaults of mode llm: the towers run once per page, so only the language model compiles
    "+vision_feature_cache+compiled_llm_layers+chunked_loss": {"train": {"compile": "llm"}, "lora": {},
                                                               "model": {}},
    # whatever params.py defaults to, in any mode: the row to set next to `baseline`
    "defaults": {"train": {}, "lora": {}, "model": {}},
}


def train_runs(base: Path, data: Path, work: Path, steps: int, configs, levers: list[str], record) -> None:
    for (mode, batch, ckpt), lever in [(c, lv) for c in configs for lv in levers]:
        if lever.startswith("+vision_feature_cache") and mode != "llm":
            continue
        settings = TRAIN_LEVERS[lever]
        params = validate_params({
            "model": {"base": str(base), "resolution": "gundam", "allow_download": False, **settings["model"]},
            "lora": {"mode": mode, **settings["lora"]},
            "train": {"max_steps": steps, "batch_size": batch, "learning_rate": 1e-4, "max_label_tokens": 1000,
                      "device": "cuda", "dtype": "bfloat16", "gradient_checkpointing": ckpt, "save_every": 0,
                      "output_dir": str(work / f"adapter-{mode}-{batch}"), **settings["train"]},
            "tracking": {"enabled": False}})
        torch.cuda.reset_peak_memory_stats()
        try:
            r = train(params, data, progress=False)
            pages = len(read_jsonl(data))
            record({"lever": lever, "mode": mode, "batch": batch, "checkpointing": ckpt,
                    "pages_per_second": round(r.pages_per_second, 2), "peak_gib": r.peak_memory_gib,
                    # the whole loop (first steps, data waits and, in mode llm, the towers' first pass)
                    "whole_pages_per_second": round(r.whole_pages_per_second, 2), "pages": pages,
                    "loss_first": round(r.losses[0], 4), "loss_last": round(r.losses[-1], 4)})
            del r
        except torch.OutOfMemoryError:
            record({"lever": lever, "mode": mode, "batch": batch, "checkpointing": ckpt, "error": "OOM"})
        except Exception as e:  # a lever that fails on this model is a result too
            record({"lever": lever, "mode": mode, "batch": batch, "checkpointing": ckpt,
                    "error": f"{type(e).__name__}: {str(e)[:300]}"})
        gc.collect()
        torch.cuda.empty_cache()


def decode_inputs(family, processor, examples, batch: int) -> dict:
    images = [load_image(e.image) for e in examples]
    images = (images * (batch // len(images) + 1))[:batch]
    inputs, _ = family.generation_inputs(processor, images, examples[0].prompt)
    return to_device(inputs, "cuda", torch.bfloat16)


def timed_generate(model, inputs, new_tokens: int, **kwargs) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


DEFAULT_BATCHED_MM_ROUTES = moe.BATCHED_MM_MAX_ROUTES_PER_EXPERT


def decode_runs(base: Path, data: Path, new_tokens: int, batches: list[int], only: list[str] | None,
                record) -> None:
    family = get_family("deepseek-ocr2")
    processor = family.load_processor(base, "gundam")
    examples = read_jsonl(data)
    model = family.load_model(base, torch.bfloat16, "cuda").eval()
    tok = processor.tokenizer
    common = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def defaults(batched_mm_max_routes_per_expert: float):
        torch.backends.cuda.enable_cudnn_sdp(False)
        family.use_fused_sam_attention(model, ModelParams().sam_attention_kernel)
        use_adaptive_experts(model)
        moe.BATCHED_MM_MAX_ROUTES_PER_EXPERT = batched_mm_max_routes_per_expert

    levers = {
        "baseline": ({}, lambda: None),
        "no_cudnn_sdpa": ({}, lambda: torch.backends.cuda.enable_cudnn_sdp(False)),
        "no_cudnn_sdpa+static_cache": ({"cache_implementation": "static"},
                                       lambda: torch.backends.cuda.enable_cudnn_sdp(False)),
        # transformers switches the routed experts to `batched_mm` for decoding, which copies an expert's
        # weights (6.9 MB) per token and expert: linear in the batch. This keeps `grouped_mm` (dynamic cache).
        "no_cudnn_sdpa+grouped_mm_decode": ({}, lambda: (torch.backends.cuda.enable_cudnn_sdp(False),
                                                         setattr(model, "_optimize_model_for_decode",
                                                                 contextlib.nullcontext))),
        # the last three change the model for good (the prefill's SAM attention, then the routed experts)
        "no_cudnn_sdpa+static_cache+fused_sam_attention": (
            {"cache_implementation": "static"},
            lambda: (torch.backends.cuda.enable_cudnn_sdp(False), family.use_fused_sam_attention(model))),
        # models.moe: every expert on every token for decode batches (the defaults of `infer` on CUDA)
        "no_cudnn_sdpa+static_cache+fused_sam_attention+adaptive_experts": (
            {"cache_implementation": "static"},
            lambda: (torch.backends.cuda.enable_cudnn_sdp(False), family.use_fused_sam_attention(model),
                     use_adaptive_experts(model))),
        "no_cudnn_sdpa+fused_sam_attention+adaptive_experts": (
            {}, lambda: (torch.backends.cuda.enable_cudnn_sdp(False), family.use_fused_sam_attention(model),
                         use_adaptive_experts(model))),
        # what `infer` does on CUDA (infer.LocalModel, train.load_base): the last row with SAM's attention on
        # the default kernel (cuDNN for the prefill)
        "defaults": ({"cache_implementation": "static"}, lambda: defaults(DEFAULT_BATCHED_MM_ROUTES)),
        # the defaults with another switch point between copying the routed experts and running all of them
        "defaults+dense_from_batch_1": ({"cache_implementation": "static"}, lambda: defaults(0.0)),
    }
    for lever, (kwargs, setup) in levers.items():
        if only and lever not in only:
            continue
        torch.backends.cuda.enable_cudnn_sdp(True)
        setup()
        for batch in batches:
            inputs = decode_inputs(family, processor, examples, batch)
            try:
                with torch.inference_mode():
                    timed_generate(model, inputs, 8, **common, **kwargs)  # warm-up (and compile)
                    prefill = min(timed_generate(model, inputs, 1, **common, **kwargs) for _ in range(2))
                    total = min(timed_generate(model, inputs, new_tokens, **common, **kwargs) for _ in range(2))
                ms_per_step = 1000 * (total - prefill) / (new_tokens - 1)
                record({"lever": lever, "batch": batch, "new_tokens": new_tokens,
                        "ms_per_token_step": round(ms_per_step, 2),
                        "tokens_per_second": round(batch * new_tokens / total, 1),
                        "decode_tokens_per_second": round(batch * 1000 / ms_per_step, 1),
                        "prefill_s": round(prefill, 3),
                        # issue 6's unit: pages of 1000 output tokens each, prefill included
                        "pages_per_second_at_1000_tokens": round(batch / (prefill + 0.999 * ms_per_step), 2)})
            except Exception as e:  # a lever that does not apply to this model is a result too
                record({"lever": lever, "batch": batch, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    torch.backends.cuda.enable_cudnn_sdp(True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ddp_bench")
    ap.add_argument("--part", nargs="+", default=["train", "decode"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--train-configs", nargs="+", default=["llm:4:none", "llm:8:none", "both:8:ckpt"],
                    help="mode:batch:ckpt|vision|none (vision: checkpoint the vision towers' layers only)")
    ap.add_argument("--levers", nargs="+", default=list(TRAIN_LEVERS), choices=list(TRAIN_LEVERS))
    ap.add_argument("--decode-levers", nargs="*", help="a subset of the decode levers (default: all)")
    ap.add_argument("--commit")
    args = ap.parse_args()
    out, base, data = speed_setup(args)
    result = {"benchmark": "speed", "env": environment(args.commit),
              "page": "1240x1754 gundam: 1121 image tokens, 1000 target tokens"}

    def recorder(part: str):
        rows = result.setdefault(part, [])

        def record(row: dict) -> None:  # written after every row: a run cut off by a time limit keeps its rows
            rows.append(row)
            print(json.dumps(row), flush=True)
            (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
        return record

    if "decode" in args.part:
        decode_runs(base, data, args.new_tokens, args.batches, args.decode_levers, recorder("decode"))
    if "train" in args.part:
        configs = [train_config(spec) for spec in args.train_configs]
        train_runs(base, data, Path(args.work), args.steps, configs, args.levers, recorder("train"))


if __name__ == "__main__":
    main()
