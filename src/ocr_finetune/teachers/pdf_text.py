"""The offline default teacher: Markdown from the PDF's own text layer (pymupdf4llm with PyMuPDF's layout model).

Headings, lists and ruled tables come out as Markdown. Pages without a text layer (scans) are returned as
`unlabeled`; OCR is deliberately off, since a guessed label would be trained on as if it were true.
"""

from __future__ import annotations

import contextlib
import io
import re
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
        unrotated = _unrotated_copy(doc, index) if doc[index].rotation else None  # before pymupdf4llm turns it
        md = _to_markdown(doc, index)
        if not md.strip() and unrotated is not None:
            md = _to_markdown(unrotated, 0)
        return clean_markdown(_strip_markup(md))

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
                    elif (share := unmapped_share(md)) > MAX_UNMAPPED:
                        yield PageLabel(p.doc, p.page, p.image.name, "unlabeled", teacher=self.name,
                                        reason=f"text layer without Unicode for its glyphs ({share:.0%} of its "
                                               "characters are U+FFFD or control codes); it needs OCR")
                    else:
                        yield PageLabel(p.doc, p.page, p.image.name, "labeled", text=md, teacher=self.name)


# pymupdf4llm's own markup around text it found in pictures and under filled boxes; the text stays
_EXTRACTOR_MARKUP = re.compile(r"<!-- (?:Start|End) of picture text -->|</?mark>")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
# a label with more unmapped characters than this teaches the model to write them
MAX_UNMAPPED = 0.01


def _strip_markup(md: str) -> str:
    # <br> is a line break; inside a table row it is the only way to write one, so it stays there
    lines = [line if line.lstrip().startswith("|") else _BREAK.sub("\n", line) for line in md.split("\n")]
    return _EXTRACTOR_MARKUP.sub("", "\n".join(lines))


def _unrotated_copy(doc: pymupdf.Document, index: int) -> pymupdf.Document:
    """The page alone without its /Rotate. Its text then runs in its own direction: for a page shown rotated
    (text sideways in the image) pymupdf4llm finds nothing, since it turns the content with the page, and the
    text runs vertically. Saved to memory: pymupdf4llm reads a document as saved."""
    one = pymupdf.open()
    one.insert_pdf(doc, from_page=index, to_page=index)
    one[0].set_rotation(0)
    return pymupdf.open("pdf", one.tobytes())


def _to_markdown(doc: pymupdf.Document, index: int) -> str:
    # Page headers and footers are kept: the label is what the image shows, and with them off pymupdf4llm
    # also dropped body lines near the top or bottom of a page (a one-line page came out empty).
    # pymupdf4llm prints a parser banner to stdout on every call; keep the progress bar readable.
    with contextlib.redirect_stdout(io.StringIO()):
        return pymupdf4llm.to_markdown(doc, pages=[index], use_ocr=False, header=True, footer=True,
                                       show_progress=False)


def unmapped_share(text: str) -> float:
    """The share of characters a font had no Unicode for (U+FFFD) or that are control codes: a text layer
    that draws glyphs nobody can read back (subset fonts without a ToUnicode map)."""
    chars = [c for c in text if not c.isspace()]
    bad = sum(1 for c in chars if c == "\ufffd" or (ord(c) < 32 and c not in "\t\n\r"))
    return bad / len(chars) if chars else 0.0
