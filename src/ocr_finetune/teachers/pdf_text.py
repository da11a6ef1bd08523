"""The offline default teacher: Markdown from the PDF's own text layer (pymupdf4llm with PyMuPDF's layout model).

Headings, lists and ruled tables come out as Markdown. Pages without a text layer (scans) are returned as
`unlabeled`; OCR is deliberately off, since a guessed label would be trained on as if it were true.
"""

from __future__ import annotations

import contextlib
import io
from collections import defaultdict
from typing import Iterable, Iterator

import pymupdf
import pymupdf4llm

from ..markdown import clean_markdown
from ..pdf import PdfError, open_pdf
from .base import PageInput, PageLabel


class PdfTextTeacher:
    name = "pdf_text"

    def __init__(self, min_chars: int = 1):
        self.min_chars = min_chars

    def _page_markdown(self, doc: pymupdf.Document, index: int) -> str:
        # pymupdf4llm prints a parser banner to stdout on every call; keep the progress bar readable.
        with contextlib.redirect_stdout(io.StringIO()):
            md = pymupdf4llm.to_markdown(doc, pages=[index], use_ocr=False, header=False, footer=False,
                                         show_progress=False)
        return clean_markdown(md)

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        by_pdf = defaultdict(list)
        for p in pages:
            by_pdf[p.pdf].append(p)
        for pdf, items in by_pdf.items():
            try:
                if pdf is None:
                    raise PdfError("no PDF for this page: the pdf_text teacher reads the PDF's text layer")
                doc = open_pdf(pdf)
            except PdfError as e:
                for p in items:
                    yield PageLabel(p.doc, p.page, p.image.name, "failed", reason=str(e), teacher=self.name)
                continue
            with doc:
                for p in items:
                    raw = doc[p.page - 1].get_text("text")
                    if len(raw.strip()) < self.min_chars:
                        yield PageLabel(p.doc, p.page, p.image.name, "unlabeled",
                                        reason="no text layer (image-only page)", teacher=self.name)
                        continue
                    md = self._page_markdown(doc, p.page - 1)
                    if not md.strip():
                        yield PageLabel(p.doc, p.page, p.image.name, "unlabeled",
                                        reason="text layer gave no Markdown", teacher=self.name)
                    else:
                        yield PageLabel(p.doc, p.page, p.image.name, "labeled", text=md, teacher=self.name)
