"""Data-parallel scaling of `ocr-finetune train` on full-size DeepSeek-OCR-2 (random weights).

Runs the product's own CLI (`train.num_gpus` makes it start torchrun) three times on the same pages:
  1 GPU, global batch B | 2 GPUs, global batch B (B/2 each: same optimisation, so the loss curves must match)
  | 2 GPUs, global batch 2B (B each: the same work per GPU, the throughput a user gains).
Every run checks inside `train` that the LoRA weights are identical on all ranks after the first and last step.

    python benchmarks/ddp_scaling.py --out results_dir [--steps 30 --batch 8 --mode llm]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from common import ROOT, environment, full_model, synthetic_pages


def run_train(work: Path, name: str, train_jsonl: Path, base: Path, gpus: int, batch: int, args) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(base=str(base), resolution="gundam", allow_download=False)
    params["lora"].update(mode=args.mode)
    params["train"].update(num_gpus=gpus, batch_size=batch, max_steps=args.steps, learning_rate=args.lr,
                           max_label_tokens=1000, device=args.device, dtype="auto",
                           gradient_checkpointing=args.checkpointing)
    params["tracking"]["enabled"] = False
    run_dir = work / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "ocr_finetune.cli", "train", "--params", str(run_dir / "params.yaml"),
                           "--dataset", str(train_jsonl), "--output", str(run_dir / "adapter"),
                           "--metrics-dir", str(run_dir / "metrics")],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"})
    if proc.returncode != 0:
        return {"name": name, "gpus": gpus, "global_batch": batch, "error": proc.stderr[-3000:]}
    metrics = json.loads((run_dir / "metrics" / "train.json").read_text())
    with open(run_dir / "metrics" / "train_loss.csv") as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f)]
    return {"name": name, "gpus": gpus, "global_batch": batch, "per_gpu_batch": batch // gpus,
            "pages_per_second": metrics["pages_per_second"], "peak_memory_gib_rank0": metrics["peak_memory_gib"],
            "wall_seconds": round(time.time() - t0, 1), "losses": losses}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/ddp_bench")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--mode", default="llm")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--commit")
    ap.add_argument("--size", default="full", help="full (GPU) | tiny (a CPU smoke run of this script)")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    base = full_model(work / f"model-{args.size}", args.size)
    data = synthetic_pages(work / "data", n=4 * args.batch)
    print(f"model + pages ready in {time.time() - t0:.0f} s", flush=True)

    runs = [run_train(work, "1gpu", data, base, 1, args.batch, args),
            run_train(work, "2gpu_same_global_batch", data, base, 2, args.batch, args),
            run_train(work, "2gpu_double_batch", data, base, 2, 2 * args.batch, args)]
    result = {"benchmark": "ddp_scaling", "mode": args.mode, "steps": args.steps, "resolution": "gundam",
              "page": "1240x1754, 1121 image tokens, 1000 target tokens", "env": environment(args.commit),
              "runs": runs}
    one, same, double = runs
    if not any("error" in r for r in runs):
        rel = [abs(a - b) / abs(a) for a, b in zip(one["losses"], same["losses"])]
        result["loss_curve_max_rel_diff_1gpu_vs_2gpu"] = round(max(rel), 5)
        result["scaling_efficiency_same_global_batch"] = round(same["pages_per_second"] / (2 * one["pages_per_second"]), 3)
        result["scaling_efficiency_same_per_gpu_batch"] = round(double["pages_per_second"] / (2 * one["pages_per_second"]), 3)
    (out / "ddp_scaling.json").write_text(json.dumps(result, indent=2) + "\n")

    print(f"{'run':26s} {'gpus':>4s} {'batch':>5s} {'pages/s':>8s} {'peak GiB':>8s} {'loss0':>7s} {'lossN':>7s}")
    for r in runs:
        if "error" in r:
            print(r["name"], "FAILED:", r["error"][-1500:])
            continue
        print(f"{r['name']:26s} {r['gpus']:4d} {r['global_batch']:5d} {r['pages_per_second']:8.2f} "
              f"{r['peak_memory_gib_rank0'] or 0:8.1f} {r['losses'][0]:7.4f} {r['losses'][-1]:7.4f}")
    for k in ("loss_curve_max_rel_diff_1gpu_vs_2gpu", "scaling_efficiency_same_global_batch",
              "scaling_efficiency_same_per_gpu_batch"):
        print(k, result.get(k))


if __name__ == "__main__":
    main()
