"""What every teacher takes and returns. A teacher turns page images (and, where it has one, the PDF) into
Markdown labels; `label_pages` drives any of them and writes the labels file the dataset is built from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Protocol


@dataclass
class PageInput:
    doc: str
    page: int  # 1-based
    image: Path
    pdf: Path | None = None


@dataclass
class PageLabel:
    doc: str
    page: int
    image: str  # file name in the pages directory
    # labeled | unlabeled (nothing to read) | failed (error, recorded) | degenerate (looping or runaway answer)
    status: Literal["labeled", "unlabeled", "failed", "degenerate"]
    text: str | None = None  # the answer (labeled, or degenerate: kept to look at, never trained on)
    reason: str | None = None
    teacher: str = ""


class Teacher(Protocol):
    name: str

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        """Yield one PageLabel per input page, in any order."""
        ...
