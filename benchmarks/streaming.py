"""Whole runs over many distinct pages (issue 16): what a user's `train` and `infer` achieve end to end, next to
the GPU's own step (or generate) rate measured in the same process, and host memory beside GPU memory.

Each row runs in a process of its own (model load reported apart):
  train:<mode>:<batch>[:<tag>]  one epoch of `train()` (the product's defaults) over --pages distinct gundam pages:
                                whole-loop pages/s (first batches, waits and the feature pass included) against
                                the steady step rate; host RSS (this process and its loader workers) at the end of
                                setup and at its peak; the share of the loop spent waiting for data.
                                tag `reuse`: lora.r=32 on the same pages, features read from the on-disk cache
                                the row before stored (the reuse check; a second epoch costs the same).
                                tags `varied` / `grouped`: the same pages (features from the cache) with labels
                                of 3-100% of the length, without and with train.group_by_length.
                                tag `warm`: the row again in a new process, torch.compile's on-disk caches
                                filled by the run before (a user's second experiment on this machine).
  baseline:<mode>:<batch>       the same through the code before the change (`--baseline-src`, the previous
                                commit's src/): every page encoded up front in the main process, kept in RAM.
  infer:<batch>                 `infer`'s own path (LocalTeacher -> infer_documents: workers read and
                                preprocess, documents written as they finish) over --infer-pages pages with a
                                fixed output length, against generate() alone on the same batches prepared
                                before; and the plain serial path (load, preprocess, generate, batch after batch).

    python benchmarks/streaming.py --out OUT --rows train:llm:8 train:llm:8:reuse train:both:24 infer:64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- host memory

class RssSampler:
    """Resident memory of this process and of its children (the loader's workers), sampled every 0.2 s."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak_main = self.peak_tree = 0
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def now(self) -> tuple[int, int]:
        """(this process's RSS, the proportional set size of it and its workers together: forked workers share
        most of their pages with it, which summed RSS would count once per worker)."""
        main = self.proc.memory_info().rss
        tree = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                tree += p.memory_full_info().pss
            except Exception:  # noqa: BLE001 - a worker that just ended
                pass
        return main, tree

    def _run(self):
        while not self.stop.is_set():
            main, tree = self.now()
            self.peak_main, self.peak_tree = max(self.peak_main, main), max(self.peak_tree, tree)
            time.sleep(0.5)


def gib(n: float) -> float:
    return round(n / 2**30, 2)


# ---------------------------------------------------------------- pages

def _page(args):
    out, i, chars = args
    import random

    from PIL import Image, ImageDraw, ImageFont

    from common import WORDS

    rng = random.Random(i)
    text = " ".join(rng.choice(WORDS) for _ in range(chars // 7))[:chars]
    lines = [text[j:j + 100] for j in range(0, len(text), 100)]
    image = Image.new("RGB", (1240, 1754), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=18)
    for k, line in enumerate(lines[:70]):
        draw.text((60, 60 + 23 * k), line, fill="black", font=font)
    name = f"page{i:05d}_p1.png"
    image.save(Path(out) / "pages" / name, compress_level=1)
    return name, "\n".join(lines)


def distinct_pages(out: Path, n: int, chars: int = 6000) -> Path:
    """n distinct A4 pages at 150 dpi (1240x1754: 1121 image tokens in gundam mode) and their JSONL, made on
    every core."""
    from ocr_finetune.dataset import make_record

    path = out / f"train-{n}.jsonl"
    if path.is_file():
        return path
    (out / "pages").mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        made = list(pool.map(_page, [(str(out), i, chars) for i in range(n)], chunksize=8))
    rows = [make_record(f"pages/{name}", "<image>\nFree OCR.", text, name[:-7], 1) for name, text in made]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # the same pages with labels of 3% to 100% of the length: what train.group_by_length is for
    rng = __import__("random").Random(1)
    for r in rows:
        text = r["messages"][1]["content"]
        r["messages"][1]["content"] = text[:max(200, int(len(text) * rng.uniform(0.03, 1.0)))]
    (out / f"train-varied-{n}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- rows (each in its own process)

def train_params(args, mode: str, batch: int, tag: str, baseline: bool = False) -> dict:
    train = {"epochs": 1, "batch_size": batch, "learning_rate": 1e-4, "max_label_tokens": 1000,
             "device": args.device, "save_every": 0, "output_dir": f"{args.work}/adapter-{mode}-{batch}",
             "checkpoint_dir": f"{args.work}/ckpt", "gradient_checkpointing": mode != "llm", "resume": "never"}
    if args.max_steps:
        train["max_steps"] = args.max_steps
    if not baseline:
        train["feature_cache_dir"] = f"{args.work}/features"
        train["group_by_length"] = tag == "grouped"
        if tag.startswith("compile="):  # another train.compile scope than auto's
            train["compile"] = tag.split("=", 1)[1]
    return {"model": {"base": str(Path(args.work) / "model"), "resolution": "gundam", "allow_download": False},
            # another experiment on the same pages (another r) reads the cache; `warm` is the same run again in a
            # new process, with torch's compile caches on disk from the run before
            "lora": {"mode": mode, "r": 32 if tag in ("reuse", "varied", "grouped") else 16}, "train": train,
            "tracking": {"enabled": False}}


def row_train(args, mode: str, batch: int, tag: str) -> dict:
    import torch

    from ocr_finetune.params import validate_params
    from ocr_finetune.train import compile_scope, loop, save, setup
    from ocr_finetune.tracking import Tracker

    data = Path(args.work) / (f"train-varied-{args.pages}.jsonl" if tag in ("varied", "grouped")
                              else f"train-{args.pages}.jsonl")
    params = validate_params(train_params(args, mode, batch, tag))
    rss = RssSampler()
    start_main, start_tree = rss.now()
    t0 = time.perf_counter()
    run = setup(params, data, Tracker(None))
    t1 = time.perf_counter()
    setup_main, setup_tree = rss.now()
    rss.peak_main, rss.peak_tree = setup_main, setup_tree  # the loop's peak from here
    stats = loop(run, progress=False)
    t2 = time.perf_counter()
    result = save(run, stats, None)
    t3 = time.perf_counter()
    pages = batch * result.steps
    return {"pages": pages, "model_load_and_setup_s": round(t1 - t0, 1), "loop_s": round(t2 - t1, 1),
            "save_s": round(t3 - t2, 1),
            "whole_pages_per_second": round(pages / (t2 - t1), 2),
            "command_pages_per_second": round(pages / (t3 - t0), 2),
            "steady_step_pages_per_second": round(result.pages_per_second, 2),
            "whole_over_steady": round(pages / (t2 - t1) / result.pages_per_second, 3),
            "data_wait_fraction": round(result.data_wait_fraction, 3),
            "features_computed": result.features_computed, "features_read": result.features_read,
            "workers": __import__("ocr_finetune.data", fromlist=["x"]).default_workers(params.train.num_workers),
            "host_rss_gib": {"start": gib(start_main), "after_setup": gib(setup_main), "peak": gib(rss.peak_main),
                             "growth_in_loop": gib(rss.peak_main - setup_main)},
            "host_pss_with_workers_gib": {"after_setup": gib(setup_tree), "peak": gib(rss.peak_tree),
                                          "growth_in_loop": gib(rss.peak_tree - setup_tree)},
            "gpu_peak_gib": result.peak_memory_gib,
            "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4),
            "compile": compile_scope(params, args.device, pages),
            # seconds from the loop's start to each of the first and the last steps' ends: the warm-up
            "step_ends_s": [round(t - stats.step_ends[0] + (stats.seconds - (stats.step_ends[-1] - stats.step_ends[0])), 1)
                            for t in stats.step_ends[:5] + stats.step_ends[-2:]]}


def row_baseline(args, mode: str, batch: int) -> dict:
    """The code before the change: its train() encodes every page first (in this process) and keeps it."""
    import torch

    from ocr_finetune.params import validate_params
    from ocr_finetune.train import load_base, train

    data = Path(args.work) / f"train-{args.baseline_pages}.jsonl"
    params = validate_params(train_params(args, mode, batch, "", baseline=True))
    rss = RssSampler()
    start_main, _ = rss.now()
    t0 = time.perf_counter()
    load_base(params, args.device, torch.bfloat16 if args.device == "cuda" else torch.float32)  # timed apart
    load_s = time.perf_counter() - t0
    rss.peak_main = rss.now()[0]
    t1 = time.perf_counter()
    result = train(params, data, progress=False)
    t2 = time.perf_counter()
    pages = batch * result.steps
    whole = pages / (t2 - t1 - load_s)
    return {"pages": pages, "model_load_s": round(load_s, 1), "train_call_s": round(t2 - t1, 1),
            "whole_pages_per_second": round(whole, 2),
            "steady_step_pages_per_second": round(result.pages_per_second, 2),
            "whole_over_steady": round(whole / result.pages_per_second, 3),
            "vision_feature_seconds": round(getattr(result, "vision_feature_seconds", 0.0), 1),
            "host_rss_gib": {"start": gib(start_main), "peak": gib(rss.peak_main),
                             "growth": gib(rss.peak_main - start_main)},
            "gpu_peak_gib": result.peak_memory_gib}


def row_infer(args, batch: int) -> dict:
    import torch

    from ocr_finetune.data import PromptPages
    from ocr_finetune.dataset import read_jsonl
    from ocr_finetune.infer import LocalModel, infer_documents
    from ocr_finetune.models.base import load_image
    from ocr_finetune.params import validate_params
    from ocr_finetune.teachers import get_teacher
    from ocr_finetune.teachers.base import PageInput

    n, new_tokens = args.infer_pages, args.new_tokens
    examples = read_jsonl(Path(args.work) / f"train-{args.pages}.jsonl")[:n]
    work = Path(args.work) / "infer"
    shutil.rmtree(work, ignore_errors=True)
    params = validate_params({"model": {"base": str(Path(args.work) / "model"), "resolution": "gundam",
                                        "allow_download": False},
                              "teacher": {"kind": "local", "cache_dir": str(work / "answers"),
                                          "prompts_file": str(ROOT / "config" / "prompts.yaml"),
                                          "local": {"batch_size": batch, "max_new_tokens": new_tokens,
                                                    "no_repeat_ngram_size": 0, "device": args.device}},
                              "train": {"device": args.device}, "tracking": {"enabled": False}})
    rss = RssSampler()
    t0 = time.perf_counter()
    model = LocalModel(params, device=args.device)
    load_s = time.perf_counter() - t0
    model.model.generation_config.min_new_tokens = new_tokens  # a fixed output length: EOS suppressed
    teacher = get_teacher(params)
    teacher._model = model
    # the teacher's prompt everywhere: a prompt of another length is another static-cache shape, compiled anew
    # (call 4 of results/streaming_h200.json warmed up on another prompt and paid that compile inside infer)
    prompt = teacher.prompt
    paths = [e.image for e in examples]

    t0 = time.perf_counter()
    model.generate([load_image(p) for p in paths[:batch]], prompt, new_tokens)  # compile and warm up
    warm_s = time.perf_counter() - t0

    # generate() alone: batches of the first --reference-pages pages, prepared before the clock starts (all
    # of a long run's would not fit in host memory: 27 MiB a page)
    ref = min(n, args.reference_pages)
    dataset = PromptPages(paths, model.family, model.processor, prompt, model.dtype)
    pad = model.processor.tokenizer.pad_token_id
    prepared = [model.family.collate_prompts([dataset[i] for i in range(s, min(s + batch, ref))], pad)
                for s in range(0, ref, batch)]
    if args.device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for inputs, width in prepared:
        model.generate_batch(inputs, width, new_tokens)
    generate_s = time.perf_counter() - t0
    del prepared

    # the product: infer's own path (the local teacher over page files, documents written as they finish)
    pages = [PageInput(e.doc, e.page, e.image) for e in examples]
    rss_before = rss.now()
    rss.peak_main, rss.peak_tree = rss_before
    t0 = time.perf_counter()
    written = infer_documents(teacher, pages, work / "out", progress=False)
    product_s = time.perf_counter() - t0
    assert len(written) == n

    # the plain path: read and preprocess a batch in this process, then generate it, batch after batch
    t0 = time.perf_counter()
    for s in range(0, ref, batch):
        model.generate([load_image(p) for p in paths[s:s + batch]], prompt, new_tokens)
    plain_s = time.perf_counter() - t0

    # preprocessing alone, one core, the PIL image processor: what a worker does per page
    t0 = time.perf_counter()
    for i in range(min(16, n)):
        dataset[i]
    per_page_s = (time.perf_counter() - t0) / min(16, n)
    return {"pages": n, "batch": batch, "new_tokens": new_tokens, "model_load_s": round(load_s, 1),
            "warmup_compile_s": round(warm_s, 1),
            "reference_pages": ref,
            "generate_only_pages_per_second": round(ref / generate_s, 2),
            "infer_pages_per_second": round(n / product_s, 2),
            "infer_over_generate_only": round((n / product_s) / (ref / generate_s), 3),
            "plain_serial_pages_per_second": round(ref / plain_s, 2),
            "infer_over_plain": round((n / product_s) / (ref / plain_s), 2),
            "first_batch_wait_s": round(teacher.model.first_wait_s or 0.0, 2),
            "preprocess_s_per_page_one_core": round(per_page_s, 3),
            "data_wait_fraction": round(getattr(teacher.model, "data_wait_fraction", 0.0), 3),
            "host_rss_gib": {"before_infer": gib(rss_before[0]), "peak_in_infer": gib(rss.peak_main),
                             "pss_with_workers_peak": gib(rss.peak_tree)},
            "gpu_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None}


def run_row(args) -> dict:
    kind, *rest = args.row.split(":")
    if kind == "train":
        return row_train(args, rest[0], int(rest[1]), rest[2] if len(rest) > 2 else "")
    if kind == "baseline":
        return row_baseline(args, rest[0], int(rest[1]))
    if kind == "infer":
        return row_infer(args, int(rest[0]))
    raise SystemExit(f"unknown row {args.row}")


# ---------------------------------------------------------------- driver

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/stream_bench")
    ap.add_argument("--rows", nargs="+", default=["train:llm:8", "train:llm:8:reuse", "infer:64"])
    ap.add_argument("--pages", type=int, default=2000)
    ap.add_argument("--baseline-pages", type=int, default=240)
    ap.add_argument("--infer-pages", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--reference-pages", type=int, default=256,
                    help="infer rows: pages of the generate-only and plain serial references")
    ap.add_argument("--max-steps", type=int, default=0, help="train rows: stop after this many steps (0: one epoch)")
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--baseline-src", default=str(ROOT / ".baseline" / "src"))
    ap.add_argument("--commit")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # a child process: run one row, print its JSON
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print("ROW " + json.dumps(run_row(args)), flush=True)
        return

    import torch

    from common import environment, full_model

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    full_model(work / "model", args.size)
    distinct_pages(work, max(args.pages, args.infer_pages))
    if any(r.startswith("baseline") for r in args.rows):
        distinct_pages(work, args.baseline_pages)
    result = {"benchmark": "streaming", "env": environment(args.commit), "pages": args.pages,
              "page": "1240x1754 gundam: 1121 image tokens, ~1000 target tokens", "setup_s": round(time.perf_counter() - t0, 1),
              "rows": []}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for row in args.rows:
        if row.startswith("train:") and row.count(":") == 2:
            shutil.rmtree(work / "features", ignore_errors=True)  # a fresh cache: this row computes every page
        env = dict(os.environ)
        src = args.baseline_src if row.startswith("baseline") else str(ROOT / "src")
        env["PYTHONPATH"] = os.pathsep.join([src, str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
        # torch.compile's on-disk caches per row: empty for a row, kept for the same row again with `:warm`,
        # so one call measures cold and warm compiles of each scope without rows warming each other
        caches = work / "compile-caches" / row.removesuffix(":warm").replace(":", "-")
        if not row.endswith(":warm"):
            shutil.rmtree(caches, ignore_errors=True)
        env["TORCHINDUCTOR_CACHE_DIR"], env["TRITON_CACHE_DIR"] = str(caches / "inductor"), str(caches / "triton")
        cmd = [sys.executable, __file__, "--row", row, "--work", str(work), "--pages", str(args.pages),
               "--baseline-pages", str(args.baseline_pages), "--infer-pages", str(args.infer_pages),
               "--new-tokens", str(args.new_tokens), "--reference-pages", str(args.reference_pages), "--max-steps", str(args.max_steps),
               "--device", device, "--out", str(out)]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("ROW ")), None)
        record = {"row": row, "process_s": round(time.perf_counter() - t0, 1)}
        record.update(json.loads(line[4:]) if line else {"error": (r.stderr or r.stdout)[-1500:]})
        result["rows"].append(record)
        print(json.dumps(record), flush=True)
        (out / "streaming.json").write_text(json.dumps(result, indent=2) + "\n")  # after every row


if __name__ == "__main__":
    main()
