"""Where a training step's time goes, full-size DeepSeek-OCR-2 (random weights) on one GPU.

Times the parts of one step with CUDA events (median of a few repeats): the vision towers' forward alone,
the whole step (forward + backward) from pixels, and the step from vision features computed beforehand; then
prints the profiler's top kernels for one step per configuration. It guides which lever to try next; the
speed of a lever is measured by speed.py, next to the baseline.

    python benchmarks/profile_step.py --out results_dir [--configs llm:4:none both:4:ckpt] [--commit SHA]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers.modeling_outputs import BaseModelOutputWithPooling

from common import environment, speed_setup, train_config

from ocr_finetune.dataset import read_jsonl
from ocr_finetune.lora import attach_lora_from_params
from ocr_finetune.models import get_family
from ocr_finetune.models.base import load_image
from ocr_finetune.params import validate_params
from ocr_finetune.compiled import compile_layers
from ocr_finetune.data import pad_batch, to_device
from ocr_finetune.train import batch_loss, detach_lm_head, enable_checkpointing

VIEW_KEYS = ("pixel_values", "pixel_values_local", "num_local_patches")


def cuda_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return round(statistics.median(times[1:]), 1)


def top_kernels(fn, n: int = 25) -> list[dict]:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or e.self_device_time_total > 0]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows) or 1
    return [{"name": e.key[:120], "ms": round(e.self_device_time_total / 1000, 2),
             "share": round(e.self_device_time_total / total, 3), "calls": e.count} for e in rows[:n]]


def run_config(base: Path, data: Path, mode: str, batch: int, ckpt: bool | str, compile_scope: str) -> dict:
    family = get_family("deepseek-ocr2")
    processor = family.load_processor(base, "gundam")
    params = validate_params({"model": {"base": str(base), "resolution": "gundam"}, "lora": {"mode": mode}})
    model = family.load_model(base, torch.bfloat16, "cuda")
    family.use_fused_sam_attention(model, params.model.sam_attention_kernel)  # as train() does by default
    family.chunk_vision_tower(model, params.model.vision_batch)
    model = attach_lora_from_params(model, family, params.lora)
    if ckpt:
        enable_checkpointing(model, ckpt)
    if compile_scope != "none":  # train()'s default on CUDA is "all"; the first (warm-up) call compiles
        compile_layers(model, compile_scope)
    model.train()
    head = detach_lm_head(model)  # the LM head and loss in chunks, as train() does by default
    examples = read_jsonl(data)[:batch]
    items = [family.encode_example(processor, load_image(e.image), e.prompt, e.target, 1000) for e in examples]
    tensors = to_device(pad_batch(items, processor.tokenizer.pad_token_id, family, left=True), "cuda", torch.bfloat16)
    inner = model.get_base_model().model
    views = {k: tensors[k] for k in VIEW_KEYS if k in tensors}

    def vision_forward():
        with torch.no_grad():
            return inner.get_image_features(**views, return_dict=True)

    def vision_backward():
        feats = inner.get_image_features(**views, return_dict=True).pooler_output
        torch.cat(feats).float().square().mean().backward()

    def step():
        batch_loss(model, tensors, True, head, 1024).backward()

    features = vision_forward().pooler_output
    cached = {k: v for k, v in tensors.items() if k not in VIEW_KEYS}
    cached["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=[f.detach() for f in features])}

    def step_cached():
        batch_loss(model, cached, True, head, 1024).backward()

    torch.cuda.reset_peak_memory_stats()
    row = {"mode": mode, "batch": batch, "checkpointing": ckpt, "compile": compile_scope, "seq_len": int(tensors["input_ids"].shape[1]),
           "vision_forward_ms": cuda_ms(vision_forward), "step_ms": cuda_ms(step),
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}
    if mode != "llm":
        row["vision_forward_backward_ms"] = cuda_ms(vision_backward)
    else:
        row["step_from_features_ms"] = cuda_ms(step_cached)
    model.zero_grad(set_to_none=True)
    row["top_kernels_step"] = top_kernels(step)
    print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_step"}), flush=True)
    for k in row["top_kernels_step"][:15]:
        print(f"  {k['ms']:9.2f} ms {k['share']:6.1%} x{k['calls']:<5d} {k['name']}", flush=True)
    del model
    torch.cuda.empty_cache()
    return row


def decode_profile(base: Path, data: Path, batch: int, static: bool, new_tokens: int = 33) -> dict:
    """Kernels of generate()'s decode steps alone: the profile of a 1-token generate (the prefill) subtracted,
    kernel by kernel, from that of a `new_tokens` generate."""
    from speed import decode_inputs

    family = get_family("deepseek-ocr2")
    processor = family.load_processor(base, "gundam")
    model = family.load_model(base, torch.bfloat16, "cuda").eval()
    family.use_fused_sam_attention(model)
    torch.backends.cuda.enable_cudnn_sdp(not static)
    inputs = decode_inputs(family, processor, read_jsonl(data), batch)
    tok = processor.tokenizer
    kwargs = {"pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False,
              "cache_implementation": "static" if static else None}

    def generate(n):
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **kwargs)

    generate(new_tokens)  # warm-up, compilation
    kernels = []
    for n in (1, new_tokens):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            generate(n)
            torch.cuda.synchronize()
        kernels.append({e.key: (e.self_device_time_total, e.count) for e in prof.key_averages()
                        if e.self_device_time_total > 0})
    steps = new_tokens - 1
    per_step = {k: ((t - kernels[0].get(k, (0, 0))[0]) / 1000 / steps, (c - kernels[0].get(k, (0, 0))[1]) / steps)
                for k, (t, c) in kernels[1].items()}
    prefill_ms, total_ms = cuda_ms(lambda: generate(1), 1), cuda_ms(lambda: generate(new_tokens), 1)
    row = {"decode_batch": batch, "static_cache": static, "ms_per_step": round((total_ms - prefill_ms) / steps, 2),
           "kernel_ms_per_step": round(sum(t for t, _ in per_step.values()), 2),
           "kernels_per_step": round(sum(c for _, c in per_step.values()))}
    top = sorted(per_step.items(), key=lambda kv: kv[1][0], reverse=True)[:20]
    row["top_kernels_per_step"] = [{"name": k[:120], "ms": round(t, 3), "calls": round(c, 1)} for k, (t, c) in top]
    print(json.dumps({k: v for k, v in row.items() if k != "top_kernels_per_step"}), flush=True)
    for k in row["top_kernels_per_step"][:14]:
        print(f"  {k['ms']:8.3f} ms x{k['calls']:<6} {k['name']}", flush=True)
    del model
    torch.cuda.empty_cache()
    torch.backends.cuda.enable_cudnn_sdp(True)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ddp_bench")
    ap.add_argument("--configs", nargs="*", default=["llm:4:none", "both:4:ckpt"],
                    help="mode:batch:ckpt|vision|none (vision: checkpoint the vision towers' layers only)")
    ap.add_argument("--compile", default="all", choices=["none", "vision", "all"], help="as train.compile")
    ap.add_argument("--decode-batches", type=int, nargs="*", default=[])
    ap.add_argument("--commit")
    args = ap.parse_args()
    out, base, data = speed_setup(args)
    result = {"benchmark": "profile_step", "env": environment(args.commit), "configs": [], "decode": []}

    def save():  # after every profile: a run cut off by a time limit keeps what it measured
        (out / "profile_step.json").write_text(json.dumps(result, indent=2) + "\n")

    for spec in args.configs:
        result["configs"].append(run_config(base, data, *train_config(spec), args.compile))
        save()
    for batch in args.decode_batches:
        for static in (False, True):
            result["decode"].append(decode_profile(base, data, batch, static))
            save()


if __name__ == "__main__":
    main()
