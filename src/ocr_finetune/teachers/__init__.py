"""Teachers label page images with Markdown. Pick one with `teacher.kind` in params.yaml."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ..params import Params
from .base import PageInput, PageLabel, Teacher


def get_teacher(params: Params) -> Teacher:
    """The teacher `params.teacher.kind` names, configured from params (and its prompts file)."""
    t = params.teacher
    if t.kind == "pdf_text":
        from .pdf_text import PdfTextTeacher

        return PdfTextTeacher(min_chars=t.min_chars)
    from .prompts import get_prompt

    prompt = get_prompt(t.prompts_file, t.task, t.prompts)
    if t.kind == "api":
        from .api import ApiTeacher

        return ApiTeacher(t.api, prompt, t.cache_dir, t.max_repeat_fraction)
    from .local import LocalTeacher

    return LocalTeacher(params, t.local, prompt, t.cache_dir, t.max_repeat_fraction)


def label_pages(teacher: Teacher, pages_dir: str | Path, pdf_dir: str | Path, out_dir: str | Path,
                progress: bool = True) -> list[PageLabel]:
    """Label every page in the render manifest; write `labels.jsonl` (one row per page, any status)."""
    from ..pdf import RenderManifest, source_pdf  # here, not at the top: training imports PageLabel without PyMuPDF

    pages_dir, out_dir = Path(pages_dir), Path(out_dir)
    manifest = RenderManifest.load(pages_dir / "manifest.json")
    inputs = [PageInput(p.doc, p.page, pages_dir / p.image, source_pdf(pdf_dir, p)) for p in manifest.pages]
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = []
    with (out_dir / "labels.jsonl").open("w", encoding="utf-8") as f:
        for label in tqdm(teacher.label(inputs), total=len(inputs), desc=f"label ({teacher.name})",
                          unit="page", disable=not progress):
            labels.append(label)
            f.write(json.dumps(asdict(label), ensure_ascii=False) + "\n")
            f.flush()
    labels.sort(key=lambda x: (x.doc, x.page))  # teachers answer in any order
    return labels


def failed_pages_error(labels: list[PageLabel], allow_failed_pages: bool = False) -> str | None:
    """Why teacher_label must not pass (exit non-zero) with these labels, or None. A stage that passes is
    recorded in dvc.lock and skipped by the next `dvc repro`, so its failed pages (a server error, a timeout, an
    unreadable image) would never be asked for again, and build_dataset would leave them out."""
    failed = sorted((x for x in labels if x.status == "failed"), key=lambda x: (x.doc, x.page))
    if not failed or allow_failed_pages:
        return None
    first = failed[0]
    return (f"{len(failed)} of {len(labels)} pages failed to be labelled (the first: {first.doc} page {first.page}: "
            f"{first.reason}). The labels and metrics of the others are written, and the api and local teachers "
            "keep every answer, so the next `dvc repro` asks for the failed pages only. To build the dataset "
            "without them, set teacher.allow_failed_pages: true")


def read_labels(path: str | Path) -> list[PageLabel]:
    path = Path(path)
    rows = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1):  # not splitlines: U+2028
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line); labels.jsonl is "
                             "written as UTF-8, so this file was changed or written by something else") from None
        if not line.strip():
            continue
        try:
            rows.append(PageLabel(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a label row ({e})") from None
    return rows


def teacher_quality(labels: list[PageLabel], truth_dir: str | Path | None) -> dict:
    """CER of each labeled page against the ground truth `{doc}_p{N}.md`, where the user has one."""
    from ..metrics import cer, summarize

    counts = {s: sum(1 for x in labels if x.status == s) for s in ("labeled", "unlabeled", "failed", "degenerate")}
    report = {"pages": len(labels), **counts, "cer": None, "per_page": []}
    if not truth_dir or not Path(truth_dir).is_dir():
        return report
    values = []
    for x in labels:
        truth = Path(truth_dir) / f"{x.doc}_p{x.page}.md"
        if x.status != "labeled" or not truth.exists():
            continue
        value = cer(truth.read_text(encoding="utf-8-sig"), x.text)  # -sig: Notepad's BOM is no text
        values.append(value)
        report["per_page"].append({"doc_page": f"{x.doc} p{x.page}", "doc": x.doc, "page": x.page,
                                   "cer": round(value, 4)})
    report["cer"] = summarize(values)
    return report
