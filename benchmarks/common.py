"""Shared pieces of the GPU benchmarks: a full-size random DeepSeek-OCR-2 and synthetic pages.

Speed and memory depend on shapes, not weights, so a model built from the published config with random
weights measures what the real checkpoint would, without a download (the GPU machine is offline).
A page here matches the issue's reference workload: an A4 scan at 150 dpi (1240x1754) in `gundam` mode =
one 1024px global view + 6 tiles of 768px = 1121 image tokens, and a 1000-token target.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ocr_finetune.dataset import make_record  # noqa: E402
from ocr_finetune.models import get_family  # noqa: E402

# The device machines share their GPUs' host: NVLink multicast stays off (device README).
for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                   "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[key] = value

WORDS = ("invoice total amount revenue quarter table report summary net income operating margin customer "
         "account balance schedule meeting agenda section figure note page date signature address").split()


def full_model(path: str | Path, size: str = "full", family: str = "deepseek-ocr2") -> Path:
    build_random = get_family(family).build_random
    if size == "tiny":
        return build_random(path, "tiny")
    return build_random(path, "full", device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)


def synthetic_pages(out: Path, n: int, chars: int = 6000, seed: int = 0) -> Path:
    """n A4 pages of printed words and a JSONL of (page, its words); returns the JSONL path."""
    rng = random.Random(seed)
    (out / "pages").mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=18)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(chars // 7))[:chars]
        lines = [text[j:j + 100] for j in range(0, len(text), 100)]
        image = Image.new("RGB", (1240, 1754), "white")
        draw = ImageDraw.Draw(image)
        for k, line in enumerate(lines[:70]):
            draw.text((60, 60 + 23 * k), line, fill="black", font=font)
        name = f"page{i:03d}_p1.png"
        image.save(out / "pages" / name)
        rows.append(make_record(f"pages/{name}", "<image>\nFree OCR.", "\n".join(lines), f"page{i:03d}", 1))
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def speed_setup(args) -> tuple[Path, Path, Path]:
    """The output folder, the full-size OCR-2 checkpoint and 16 synthetic full pages that speed.py and
    profile_step.py share (built once per `--work` folder)."""
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out, full_model(work / "model-full"), synthetic_pages(work / "data-speed", n=16)


def train_config(spec: str) -> tuple[str, int, bool | str]:
    """`mode:batch:checkpointing` -> (mode, batch, train.gradient_checkpointing); checkpointing is ckpt (every
    layer), vision (the vision towers' layers only) or none."""
    mode, batch, ckpt = spec.split(":")
    return mode, int(batch), {"ckpt": True, "none": False, "vision": "vision"}[ckpt]


def environment(commit: str | None) -> dict:
    import peft
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"commit": commit, "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "driver": _driver()}


def _driver() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip() or None
    except OSError:
        return None
