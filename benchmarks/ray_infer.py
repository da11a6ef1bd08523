"""`infer` on the Ray engine against the local engine, same pages, same params, one process per row (issue 20).

Each row is what a user's command does, timed from its start to the last document written: the teacher
built (for `local`: the model loaded here; for `ray`: a local Ray cluster started, the model loaded in its
GPU actor), every page read, preprocessed, decoded and written (`infer_documents`). Beside the whole run, the
rate after the first document (compile and load excluded) and host memory; each row has its own empty
torch.compile cache. The rows' output files are compared: the engines decode the same batches.

    python benchmarks/ray_infer.py --out OUT --pages 512 --batch 64 --rows local ray
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def row(args) -> dict:
    from streaming import RssSampler, gib

    from ocr_finetune.dataset import read_jsonl
    from ocr_finetune.infer import infer_documents
    from ocr_finetune.params import validate_params
    from ocr_finetune.teachers import get_teacher
    from ocr_finetune.teachers.base import PageInput

    work = Path(args.work)
    examples = read_jsonl(work / f"train-{args.pages_made}.jsonl")[:args.pages]
    out = work / f"ray-infer-{args.row}"
    shutil.rmtree(out, ignore_errors=True)
    params = validate_params({
        "model": {"base": str(work / "model"), "resolution": "gundam", "allow_download": False},
        "teacher": {"kind": "local", "cache_dir": str(out / "answers"),
                    "prompts_file": str(ROOT / "config" / "prompts.yaml"),
                    "local": {"batch_size": args.batch, "max_new_tokens": args.new_tokens,
                              "no_repeat_ngram_size": 0}},
        "runtime": {"engine": args.row}, "tracking": {"enabled": False}})
    pages = [PageInput(e.doc, e.page, e.image) for e in examples]
    rss = RssSampler()
    start = rss.now()
    wall0, t0 = time.time(), time.perf_counter()
    teacher = get_teacher(params)
    written = infer_documents(teacher, pages, out / "docs", progress=False)
    total_s = time.perf_counter() - t0
    assert len(written) == len(pages), (len(written), len(pages))
    # a document is written the moment its page is decoded (one page each here): the files' times are when
    # the pages finished
    done = sorted(path.stat().st_mtime - wall0 for path in (out / "docs").glob("*.md"))
    first_doc = done[0]
    timeline = getattr(teacher.model, "timeline", None)  # the Ray engine's: when each batch was where
    if timeline:
        first = min(timeline, key=lambda t: t["decode"][0])
        timeline = {"first_batch_prepared_s": [round(x - wall0, 1) for x in first["prepare"]],
                    "first_batch_decoded_s": [round(x - wall0, 1) for x in first["decode"]],
                    "actor_ready_s": round(min(t["actor_ready"] for t in timeline) - wall0, 1),
                    "prepare_s_per_batch_mean": round(sum(t["prepare"][1] - t["prepare"][0] for t in timeline)
                                                      / len(timeline), 1)}
    digest = hashlib.sha256()
    for path in sorted((out / "docs").glob("*.md")):
        digest.update(path.name.encode() + path.read_bytes())
    after_first = (len(pages) - args.batch) / (done[-1] - first_doc) if done[-1] > first_doc else None
    return {"engine": args.row, "pages": len(pages), "batch": args.batch, "new_tokens": args.new_tokens,
            "whole_run_s": round(total_s, 1), "whole_pages_per_second": round(len(pages) / total_s, 2),
            "first_document_s": round(first_doc, 1),
            "pages_per_second_after_first_batch": round(after_first, 2) if after_first else None,
            "outputs_sha256": digest.hexdigest(), **({"ray_timeline": timeline} if timeline else {}),
            "output_chars": sum(len(p.read_text()) for p in (out / "docs").glob("*.md")),
            "host_rss_gib": {"start": gib(start[0]), "peak": gib(rss.peak_main),
                             "pss_with_children_peak": gib(rss.peak_tree)}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/stream_bench")
    ap.add_argument("--rows", nargs="+", default=["local", "ray"])
    ap.add_argument("--pages", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--size", default="full", choices=["full", "tiny"])
    ap.add_argument("--commit")
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--pages-made", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.row:
        print("ROW " + json.dumps(row(args)), flush=True)
        return

    from common import environment, full_model
    from streaming import distinct_pages

    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    full_model(work / "model", args.size)
    made = max(args.pages, *[int(p.stem.split("-")[1]) for p in work.glob("train-[0-9]*.jsonl")], 0)
    distinct_pages(work, made)
    env = environment(args.commit)
    try:
        import ray

        env["ray"] = ray.__version__
    except ImportError:
        pass
    result = {"benchmark": "ray_infer", "env": env, "setup_s": round(time.perf_counter() - t0, 1), "rows": []}
    for name in args.rows:
        caches = work / "compile-caches" / f"ray-infer-{name}"
        shutil.rmtree(caches, ignore_errors=True)
        child = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"),
                     TRITON_CACHE_DIR=str(caches / "triton"))
        child["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks"),
                                               child.get("PYTHONPATH", "")])
        cmd = [sys.executable, __file__, "--row", name, "--work", str(work), "--out", str(out), "--pages",
               str(args.pages), "--pages-made", str(made), "--batch", str(args.batch), "--new-tokens",
               str(args.new_tokens)]
        t1 = time.perf_counter()
        r = subprocess.run(cmd, env=child, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("ROW ")), None)
        record = {"row": name, "process_s": round(time.perf_counter() - t1, 1)}
        record.update(json.loads(line[4:]) if line else {"error": (r.stderr or r.stdout)[-2500:]})
        result["rows"].append(record)
        print(json.dumps(record), flush=True)
        (out / "ray_infer.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = {r["row"]: r for r in result["rows"] if "error" not in r}
    if "local" in rows and "ray" in rows:
        result["ray_over_local_whole"] = round(rows["ray"]["whole_pages_per_second"]
                                               / rows["local"]["whole_pages_per_second"], 3)
        result["ray_over_local_after_first_batch"] = round(
            rows["ray"]["pages_per_second_after_first_batch"] / rows["local"]["pages_per_second_after_first_batch"], 3)
        result["outputs_identical"] = rows["ray"]["outputs_sha256"] == rows["local"]["outputs_sha256"]
        print(json.dumps({k: result[k] for k in ("ray_over_local_whole", "ray_over_local_after_first_batch",
                                                 "outputs_identical")}), flush=True)
    (out / "ray_infer.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
