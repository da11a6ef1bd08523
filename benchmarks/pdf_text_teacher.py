"""Which extractor labels digital PDF pages best (issue 18): measured, not assumed.

Runs on the CPU machine (no GPU, no network). Each extractor reads every page of the regression corpus
(ocr_finetune.regression_corpus: one PDF per failure class, truth from the same source) and of the shipped
demo corpus (data/samples); scores: jiwer CER after whitespace collapse, TEDS on table pages, reading-order
inversions, labels holding U+FFFD / private-use / control characters, pages labelled that should not be
(scan with an invisible OCR layer, blank, glyphs without Unicode), pages/s in one process. Then the teacher
itself over many pages with 1 and with all cores (its process pool).

    .venv/bin/python benchmarks/pdf_text_teacher.py --out benchmarks/results/pdf_text_teacher.json

pdfplumber is measured when installed (`pip install pdfplumber`); it is no dependency of the project.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import pymupdf  # noqa: E402

from ocr_finetune import regression_corpus as rc  # noqa: E402
from ocr_finetune.markdown import clean_markdown  # noqa: E402
from ocr_finetune.teachers.base import PageInput  # noqa: E402
from ocr_finetune.teachers.pdf_text import PdfTextTeacher  # noqa: E402
from ocr_finetune.teachers.text_layer import page_text  # noqa: E402


# ---------------------------------------------------------------- extractors: (pdf path, doc, index) -> text | None

def get_text(path, doc, i):
    return doc[i].get_text() or None


def get_text_sorted(path, doc, i):
    return doc[i].get_text(sort=True) or None


_MARKUP = re.compile(r"<!-- (?:Start|End) of picture text -->|</?mark>")


def pymupdf4llm_layout(path, doc, i):
    """The teacher before issue 18: pymupdf4llm (layout model) + clean_markdown, as it ran."""
    import pymupdf4llm

    page = doc[i]
    if not page.get_text("text").strip():
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        md = pymupdf4llm.to_markdown(doc, pages=[i], use_ocr=False, header=True, footer=True, show_progress=False)
    lines = [x if x.lstrip().startswith("|") else re.sub(r"<br\s*/?>", "\n", x) for x in md.split("\n")]
    md = clean_markdown(_MARKUP.sub("", "\n".join(lines)))
    chars = [c for c in md if not c.isspace()]
    if not chars or sum(c == "\ufffd" or ord(c) < 32 for c in chars) / len(chars) > 0.01:
        return None
    return md


def text_layer(path, doc, i):
    result = page_text(doc[i])
    return result.text if result.status == "labeled" else None


_PLUMBER: dict = {}


def pdfplumber_text(path, doc, i):
    import pdfplumber

    if path not in _PLUMBER:
        _PLUMBER.clear()
        _PLUMBER[path] = pdfplumber.open(path)
    return _PLUMBER[path].pages[i].extract_text() or None


EXTRACTORS = {"get_text": get_text, "get_text_sorted": get_text_sorted, "pymupdf4llm_layout": pymupdf4llm_layout,
              "pdfplumber": pdfplumber_text, "text_layer": text_layer}


def corpus_pages(corpus_dir: Path) -> list[tuple[str, Path, int, str]]:
    pages = []
    for pdf in sorted((corpus_dir / "pdfs").glob("*.pdf")):
        with pymupdf.open(pdf) as doc:
            n = len(doc)
        for i in range(n):
            pages.append((pdf.stem, pdf, i, (corpus_dir / "truth" / f"{pdf.stem}_p{i + 1}.md").read_text()))
    return pages


def run_extractor(fn, pages, repeats: int):
    outputs, start = {}, time.perf_counter()
    for _ in range(repeats):
        for name, pdf, i, _truth in pages:
            with pymupdf.open(pdf) as doc:
                outputs[(name, i)] = fn(str(pdf), doc, i)
    return outputs, len(pages) * repeats / (time.perf_counter() - start)


def measure(corpus_dir: Path, expected: dict, extractors: dict, repeats: int) -> dict:
    pages = corpus_pages(corpus_dir)
    digital = [p for p in pages if p[0] not in expected and p[3].strip() and "scanned" not in p[0]]
    results, outputs = {}, {}
    for key, fn in extractors.items():
        outputs[key], _ = run_extractor(fn, pages, 1)
        _, speed = run_extractor(fn, digital, repeats)
        scores = {f"{n} p{i + 1}": rc.page_score(t, outputs[key][(n, i)]) for n, _, i, t in pages}
        wrong = [f"{n} p{i + 1}" for n, _, i, _ in pages if n in expected and outputs[key][(n, i)] is not None]
        results[key] = {"pages_per_s_one_core": round(speed, 2), "pages_labelled_that_should_not_be": wrong,
                        "per_page": scores}
    # the comparison that counts: the same pages for every extractor (those the new teacher labels)
    same = [f"{n} p{i + 1}" for n, _, i, _ in pages if outputs["text_layer"][(n, i)] is not None]
    for key, r in results.items():
        r["on_pages_text_layer_labels"] = rc.summary([r["per_page"][k] for k in same])
        r["all_pages"] = rc.summary(list(r["per_page"].values()))
    return {"pages": len(pages), "digital_pages_timed": len(digital), "same_pages": same, "extractors": results}


def teacher_speed(corpus_dir: Path, copies: int, worker_counts: list[int]) -> dict:
    """The teacher over `copies` x the corpus' pages with text, with each worker count. CPU seconds (this
    process and its workers) beside wall time: on a shared machine other jobs take cores and wall time
    says little about the work done."""
    pages = [PageInput(n, i + 1, Path(f"{n}_p{i + 1}.png"), pdf) for n, pdf, i, t in corpus_pages(corpus_dir)
             if t.strip()] * copies
    out = {"pages": len(pages), "cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg()[0]}
    for workers in worker_counts:
        cpu0 = _cpu_seconds()
        start = time.perf_counter()
        labels = list(PdfTextTeacher(workers=workers).label(pages))
        seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
        assert len(labels) == len(pages)
        out[f"workers_{workers}"] = {"seconds": round(seconds, 2), "pages_per_s": round(len(pages) / seconds, 1),
                                     "pages_per_s_per_worker": round(len(pages) / seconds / workers, 1),
                                     "cpu_seconds": round(cpu, 2), "pages_per_cpu_second": round(len(pages) / cpu, 1)}
    return out


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("pymupdf", "pymupdf4llm", "pymupdf_layout", "pdfplumber", "pdfminer.six", "jiwer"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[pkg] = metadata.version(pkg)
    return out


def machine() -> dict:
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), "")
    return {"platform": platform.platform(), "cpu": cpu, "cores": len(os.sched_getaffinity(0))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pdf_text_teacher.json"))
    ap.add_argument("--part", nargs="+", default=["extractors", "pool"], choices=["extractors", "pool"])
    ap.add_argument("--repeats", type=int, default=3, help="timing passes over the digital pages")
    ap.add_argument("--copies", type=int, default=20, help="corpus copies for the teacher's pool timing")
    ap.add_argument("--workers", type=int, nargs="+", help="worker counts for the pool timing (default 1, cores)")
    ap.add_argument("--key", default="", help="suffix of the pool result's key (e.g. the machine)")
    args = ap.parse_args()
    extractors = dict(EXTRACTORS)
    try:
        import pdfplumber  # noqa: F401
    except ImportError:
        extractors.pop("pdfplumber")
    out = Path(args.out)
    result = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}  # parts not run stay
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        rc.write_corpus(Path(tmp) / "regression")
        if "extractors" in args.part:
            result.update({"commit": commit, "machine": machine(), "versions": versions(),
                           "regression_corpus": measure(Path(tmp) / "regression", rc.EXPECTED, extractors,
                                                        args.repeats),
                           "demo_corpus": measure(ROOT / "data" / "samples",
                                                  {"scanned_letter": ("unlabeled", "text layer")}, extractors,
                                                  args.repeats)})
            _print_table(result)
        if "pool" in args.part:
            workers = args.workers or sorted({1, len(os.sched_getaffinity(0))})
            key = "teacher_pool" + (f"_{args.key}" if args.key else "")
            result[key] = {"commit": commit, "machine": machine(), "versions": versions(),
                           **teacher_speed(Path(tmp) / "regression", args.copies, workers)}
            print(json.dumps(result[key]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def _print_table(result: dict) -> None:
    print(f"{'extractor':20} {'corpus':10} {'CER':>7} {'TEDS':>6} {'inv':>4} {'U+FFFD':>6} {'wrong':>5} {'pages/s':>8}")
    for corpus in ("regression_corpus", "demo_corpus"):
        for key, r in result[corpus]["extractors"].items():
            s = r["on_pages_text_layer_labels"]
            print(f"{key:20} {corpus[:10]:10} {s['cer_mean']:7.4f} {s['teds_mean'] or 0:6.3f} {s['inversions']:4d} "
                  f"{r['all_pages']['labels_with_unmapped']:6d} {len(r['pages_labelled_that_should_not_be']):5d} "
                  f"{r['pages_per_s_one_core']:8.1f}")


if __name__ == "__main__":
    main()
