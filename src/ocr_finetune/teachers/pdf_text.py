"""The offline default teacher: Markdown from the PDF's own text layer (text_layer.py), pages in parallel.

Headings, lists, tables (ruled, ruled only across as LaTeX sets them, or not ruled at all, columns only as
aligned white space; HTML where cells are merged) and display formulas (numbered ones with `\\tag`) come out
as Markdown, in reading order across columns. Pages without a usable text layer (scans, an invisible OCR
layer, blank pages, glyphs without Unicode) are returned as `unlabeled` with the reason; OCR is deliberately
off, since a guessed label would be trained on as if it were true.

The extractor was chosen by measurement (benchmarks/pdf_text_teacher.py, results/pdf_text_teacher.json):
on the regression corpus (ocr_finetune.regression_corpus) mean CER 0.000 against 0.185 for pymupdf4llm's
layout mode (the teacher before), 0.416 for pdfplumber and 0.46 for plain `get_text()`, TEDS 1.00 against
0.77, at ~30-60 pages/s on one core against ~2 for pymupdf4llm.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Iterable, Iterator

from ..pdf import PdfError, open_pdf
from .base import PageInput, PageLabel

# pages per task: a document's pages spread over the cores, and one PDF is opened once per task
CHUNK_PAGES = 16
# fewer pages than this are labelled in this process: starting workers costs more than they save
POOL_MIN_PAGES = 24


class PdfTextTeacher:
    name = "pdf_text"

    def __init__(self, min_chars: int = 1, workers: int | None = None):
        self.min_chars = min_chars
        self.workers = workers or len(os.sched_getaffinity(0))

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        """Labels grouped by PDF in the order the PDFs first appear, pages in their given order."""
        pages = list(pages)
        tasks = _tasks(pages)
        if self.workers < 2 or len(pages) < POOL_MIN_PAGES or len(tasks) < 2:
            for task in tasks:
                yield from label_task(task, self.min_chars)
            return
        yield from _in_pool(tasks, self.min_chars, min(self.workers, len(tasks)))


def _tasks(pages: list[PageInput]) -> list[list[PageInput]]:
    by_pdf: dict = {}
    for p in pages:
        by_pdf.setdefault(p.pdf, []).append(p)
    return [items[i:i + CHUNK_PAGES] for items in by_pdf.values() for i in range(0, len(items), CHUNK_PAGES)]


def _in_pool(tasks, min_chars: int, workers: int) -> Iterator[PageLabel]:
    # fork: the stage scripts run at import, and spawn or forkserver would import them again in each worker
    context = get_context("fork")
    pool = ProcessPoolExecutor(workers, mp_context=context)
    try:
        futures = [pool.submit(label_task, t, min_chars) for t in tasks]
        for n, (task, future) in enumerate(zip(tasks, futures)):
            try:
                yield from future.result()
            except BrokenProcessPool:  # a worker died (MuPDF crashed on a page): those pages fail, the rest go on
                yield from _failed(task, "the PDF reader crashed on these pages (worker process died)")
                pool.shutdown(cancel_futures=True)
                pool = ProcessPoolExecutor(workers, mp_context=context)
                futures[n + 1:] = [pool.submit(label_task, t, min_chars) for t in tasks[n + 1:]]
    finally:
        pool.shutdown(cancel_futures=True)


def _failed(task: list[PageInput], reason: str) -> list[PageLabel]:
    return [PageLabel(p.doc, p.page, p.image.name, "failed", reason=reason, teacher=PdfTextTeacher.name)
            for p in task]


def label_task(task: list[PageInput], min_chars: int) -> list[PageLabel]:
    """Pages of one PDF; an error on one page fails that page only."""
    from .text_layer import page_text  # here: imports PyMuPDF, which training does not need

    pdf = task[0].pdf
    try:
        if pdf is None:
            raise PdfError("no PDF for this page: the pdf_text teacher reads the PDF's text layer")
        doc = open_pdf(pdf)
    except PdfError as e:
        return _failed(task, str(e))
    labels = []
    with doc:
        for p in task:
            try:
                result = page_text(doc[p.page - 1], min_chars)
            except Exception as e:  # noqa: BLE001 - one odd page must not cost the others
                labels.append(PageLabel(p.doc, p.page, p.image.name, "failed", teacher=PdfTextTeacher.name,
                                        reason=f"text layer not readable: {type(e).__name__}: {e}"))
                continue
            labels.append(PageLabel(p.doc, p.page, p.image.name, result.status, text=result.text,
                                    reason=result.reason, teacher=PdfTextTeacher.name))
    return labels
