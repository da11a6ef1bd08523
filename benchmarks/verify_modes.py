"""GPU verification of the model layer on full-size models (random weights), per LoRA mode.

For each mode: `train` (the product's loop) runs 30 steps on one fixed batch of full pages; the loss must be
finite and fall; the adapter is saved, reloaded onto a freshly loaded base the way `evaluate`/`infer` load it,
and the reloaded model's logits must equal the in-memory fine-tuned model's. Peak memory and s/step per mode.

    python benchmarks/verify_modes.py --out results_dir [--modes vision llm both --batch 2 --steps 30]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import time
from pathlib import Path

import torch

from common import environment, full_model, synthetic_pages

from ocr_finetune.dataset import read_jsonl
from ocr_finetune.lora import load_adapter
from ocr_finetune.models import get_family
from ocr_finetune.models.base import load_image
from ocr_finetune.params import validate_params
from ocr_finetune.data import pad_batch, to_device
from ocr_finetune.loading import load_base
from ocr_finetune.train import train


def verify(mode: str, base: Path, data: Path, work: Path, args) -> dict:
    params = validate_params({
        "model": {"family": args.family, "base": str(base), "resolution": args.resolution, "allow_download": False,
                  "load_in_4bit": args.load_in_4bit},
        "lora": {"mode": mode, "experts": args.experts} if args.experts else {"mode": mode},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "learning_rate": args.lr,
                  "max_label_tokens": args.label_tokens, "device": "cuda", "dtype": "bfloat16",
                  "gradient_checkpointing": mode != "llm" or args.checkpointing,
                  "output_dir": str(work / f"adapter-{mode}")},
        "tracking": {"enabled": False},
    })
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    result = train(params, data, progress=False)
    seconds = time.time() - t0
    trained = result.model
    trained.eval()
    family = get_family(args.family)
    examples = read_jsonl(data)[: args.batch]
    processor = family.load_processor(base, args.resolution)
    batch = pad_batch([family.encode_example(processor, load_image(e.image), e.prompt, e.target, args.label_tokens)
                       for e in examples], processor.tokenizer.pad_token_id, family)
    batch = to_device(batch, "cuda", torch.bfloat16)
    batch.pop("labels")
    with torch.inference_mode():
        mem_logits = trained(**batch).logits.float()
    del trained, result.model
    gc.collect()
    torch.cuda.empty_cache()
    reloaded = load_adapter(load_base(params, "cuda", torch.bfloat16)[1], result.adapter_dir)
    with torch.inference_mode():
        disk_logits = reloaded(**batch).logits.float()
        with reloaded.disable_adapter():
            plain_logits = reloaded(**batch).logits.float()
    row = {
        "mode": mode, "trainable_params": result.trainable_params, "steps": result.steps,
        "batch": args.batch, "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4),
        "loss_finite": all(math.isfinite(x) for x in result.losses), "loss_fell": result.losses[-1] < result.losses[0],
        "s_per_step": round(args.batch / result.pages_per_second, 3), "pages_per_second": round(result.pages_per_second, 2),
        "peak_memory_gib": result.peak_memory_gib, "wall_seconds": round(seconds, 1),
        "weights_gib": round(sum(p.numel() * p.element_size() for p in reloaded.parameters()) / 2**30, 2),
        "reload_max_abs_logit_diff": float((disk_logits - mem_logits).abs().max()),
        "adapter_changes_logits": float((disk_logits - plain_logits).abs().max()),
    }
    row["reload_exact"] = row["reload_max_abs_logit_diff"] == 0.0
    del reloaded, mem_logits, disk_logits, plain_logits
    gc.collect()
    torch.cuda.empty_cache()
    return row


def v1_checks(base: Path, data: Path) -> dict:
    """The full-size v1 checkpoint (saved under v1's remote-code weight names) loads into the native class with
    no missing or unexpected keys; our PIL image processor matches transformers' torchvision one per preset."""
    import numpy as np
    from safetensors import safe_open
    from transformers import UnlimitedOcrForConditionalGeneration
    from transformers.models.unlimited_ocr.image_processing_unlimited_ocr import UnlimitedOcrImageProcessor

    family = get_family("deepseek-ocr")
    keys = []
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            keys += list(f.keys())
    model, info = UnlimitedOcrForConditionalGeneration.from_pretrained(
        base, config=family.load_config(base), dtype=torch.bfloat16, output_loading_info=True)
    out = {"checkpoint_tensors": len(keys), "v1_names": sum(k.startswith(("model.sam_model.", "model.vision_model.",
                                                                          "model.layers.")) for k in keys),
           "parameters": sum(p.numel() for p in model.parameters()),
           "missing_keys": len(info["missing_keys"]), "unexpected_keys": len(info["unexpected_keys"]),
           "mismatched_keys": len(info["mismatched_keys"]), "processor_max_abs_diff": {}}
    del model
    image = load_image(read_jsonl(data)[0].image)
    for preset, kwargs in family.RESOLUTIONS.items():
        ours = family.UnlimitedOcrImageProcessorPil(**kwargs)(image, return_tensors="pt")
        ref = UnlimitedOcrImageProcessor(**kwargs)(image, return_tensors="pt")
        diffs = {k: float((ours[k].float() - ref[k].float()).abs().max()) for k in ("pixel_values", "pixel_values_local")
                 if k in ref}
        same_layout = (ours["num_local_patches"] == ref["num_local_patches"]
                       and ours["patches_grid"] == ref["patches_grid"] and set(ours.keys()) == set(ref.keys()))
        out["processor_max_abs_diff"][preset] = {**diffs, "same_tiles": bool(same_layout),
                                                 "mean_abs_diff": float(np.mean([
                                                     (ours[k].float() - ref[k].float()).abs().mean().item()
                                                     for k in diffs]))}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ddp_bench")
    ap.add_argument("--family", default="deepseek-ocr2")
    ap.add_argument("--modes", nargs="+", default=["vision", "llm", "both"])
    ap.add_argument("--resolution", default="gundam")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--label-tokens", type=int, default=1000)
    ap.add_argument("--experts", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--commit")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = full_model(work / ("model-full" if args.family == "deepseek-ocr2" else f"model-full-{args.family}"),
                      family=args.family)
    data = synthetic_pages(work / "data-verify", n=args.batch)  # one fixed batch: the loss must fall on it
    checks = v1_checks(base, data) if args.family == "deepseek-ocr" else {}
    print(json.dumps(checks), flush=True)
    rows = []
    for mode in args.modes:
        try:
            rows.append(verify(mode, base, data, work, args))
        except torch.OutOfMemoryError as e:
            rows.append({"mode": mode, "error": f"out of memory: {str(e)[:300]}"})
            gc.collect()
            torch.cuda.empty_cache()
        print(json.dumps(rows[-1]), flush=True)
    name = f"verify_{args.family}{'_experts' if args.experts else ''}{'_4bit' if args.load_in_4bit else ''}.json"
    (out / name).write_text(json.dumps({"benchmark": "verify_modes", "family": args.family,
                                        "resolution": args.resolution, "env": environment(args.commit),
                                        "checks": checks, "rows": rows}, indent=2) + "\n")
    print(f"{'mode':8s} {'trainable':>12s} {'loss0':>7s} {'loss30':>7s} {'s/step':>7s} {'peak GiB':>8s} {'reload':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:8s} {r['error'][:80]}")
        else:
            print(f"{r['mode']:8s} {r['trainable_params']:12,d} {r['loss_first']:7.3f} {r['loss_last']:7.3f} "
                  f"{r['s_per_step']:7.3f} {r['peak_memory_gib']:8.1f} {str(r['reload_exact']):>7s}")


if __name__ == "__main__":
    main()
