"""LoRA training speed of Unsloth on full-size DeepSeek-OCR-2, for comparison with this project's backend.

Unsloth pins transformers <= 5.17, so this runs in its own environment (benchmarks/unsloth_site.sh builds
it) and imports from this project only the input building (the dataset reader, the OCR-2 family's encoding and `data.pad_batch`,
which work on 5.17): both backends see the same pages, tokens and labels as `train()`. The loop is the same for both
backends (AdamW, bf16, fixed batches), so it times what Unsloth changes: its patched model, LoRA layers and
gradient checkpointing. `--backend plain` is transformers + PEFT in the same environment, as a reference.
This project's own numbers come from speed.py (transformers 5.23) in the same call.

    PYTHONPATH=/tmp/unsloth-site:src python benchmarks/unsloth_speed.py --base /tmp/ddp_bench/model-full \
        --data /tmp/ddp_bench/data-speed/train.jsonl --out results_dir --mode llm --batch 8
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
import time
from pathlib import Path

if not {"plain", "--backend=plain"} & set(sys.argv):  # Unsloth patches transformers and PEFT as it is imported
    import unsloth  # noqa: F401
import torch

from ocr_finetune.dataset import read_jsonl
from ocr_finetune.models import deepseek_ocr2 as family
from ocr_finetune.models.base import load_image
from ocr_finetune.data import pad_batch, to_device


def batch_inputs(processor, data: Path, batch: int, device: str, dtype: torch.dtype) -> dict:
    items = [family.encode_example(processor, load_image(e.image), e.prompt, e.target, 1000)
             for e in read_jsonl(data)[:batch]]
    return to_device(pad_batch(items, processor.tokenizer.pad_token_id, family), device, dtype)


def load(backend: str, base: Path, mode: str, r: int, checkpointing: bool, device: str, dtype: torch.dtype):
    if backend == "unsloth":
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(str(base), load_in_4bit=False, dtype=torch.bfloat16,
                                                   use_gradient_checkpointing="unsloth" if checkpointing else False)
        # The modules train() adapts, as full paths: given its own broad names, Unsloth also adds LoRA on the
        # routed experts (16x the trainable parameters), which our backend does only with lora.experts.
        targets = [n for n, _ in model.named_modules() if re.fullmatch(family.lora_targets(mode), n)]
        # get_peft_model turns on Unsloth's offloaded checkpointing by default: passed explicitly so that
        # --checkpointing means the same for both backends
        model = FastVisionModel.get_peft_model(model, target_modules=targets, r=r, lora_alpha=2 * r,
                                               lora_dropout=0, bias="none", random_state=0,
                                               use_gradient_checkpointing="unsloth" if checkpointing else False)
        FastVisionModel.for_training(model)
        return model
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=dtype).to(device)
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=family.lora_targets(mode)))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", choices=["unsloth", "plain"], default="unsloth")
    ap.add_argument("--mode", choices=["llm", "both"], default="llm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the plain backend on a tiny model")
    ap.add_argument("--commit")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    processor = family.load_processor(args.base, "gundam")
    inputs = batch_inputs(processor, Path(args.data), args.batch, args.device, dtype)
    model = load(args.backend, Path(args.base), args.mode, 16, args.checkpointing, args.device, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ends, losses = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        ends.append(time.perf_counter())
        losses.append(round(loss.item(), 4))
    warm = min(3, len(ends) // 3)  # the first steps compile and warm up
    import transformers

    row = {"benchmark": "unsloth_speed", "backend": args.backend, "mode": args.mode, "batch": args.batch,
           "checkpointing": args.checkpointing, "steps": args.steps,
           "pages_per_second": round(args.batch * (len(ends) - 1 - warm) / (ends[-1] - ends[warm]), 2),
           "first_step_s": round(ends[0] - start, 1), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "trainable_params": sum(p.numel() for p in trainable), "losses": losses,
           "env": {"commit": args.commit, "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                   "transformers": transformers.__version__, "python": platform.python_version()}}
    if args.backend == "unsloth":
        import unsloth

        row["env"]["unsloth"] = unsloth.__version__
    print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"unsloth_speed_{args.backend}_{args.mode}_b{args.batch}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
