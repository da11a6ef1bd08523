"""Small, explicit clean-ups of Markdown produced by extractors and models."""

from __future__ import annotations

import re

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)]) ")
# a GFM delimiter row: `|---|:---:|`, outer pipes optional, at least one pipe
_DELIMITER = re.compile(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*")


def _unbold(s: str) -> str:
    return _BOLD.sub(r"\1", s)


def table_row(line: str) -> str:
    """One canonical spelling of a Markdown table row: `| a | b |`, separator rows as `|---|---|`."""
    cells = [_unbold(c).strip() for c in line.strip().strip("|").split("|")]
    if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
        return "|" + "|".join(c.replace("-" * len(c.strip(":")), "---") for c in cells) + "|"
    return "| " + " | ".join(cells) + " |"


def _table_lines(lines: list[str]) -> set[int]:
    """Indices of the lines of GFM tables: a `|` row over a delimiter row, and the `|` rows after it. A line
    that only starts with `|` (`|x| = 3 is small`) is prose and stays as written."""
    rows, i = set(), 0
    while i < len(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if "|" in lines[i] and _DELIMITER.fullmatch(nxt):
            rows.update((i, i + 1))
            i += 2
            while i < len(lines) and "|" in lines[i] and lines[i].strip():
                rows.add(i)
                i += 1
        else:
            i += 1
    return rows


def clean_markdown(md: str) -> str:
    """Normalise extractor quirks that carry no content.

    pymupdf4llm wraps headings and table header cells in `**` (the PDF used a bold font), leaves a blank line
    between list items and trailing spaces on every line. A model trained on those labels would learn the
    noise, so they are removed here; everything else (nesting, tables, order) is kept as extracted.
    """
    lines = [line.rstrip() for line in md.replace("\r\n", "\n").split("\n")]
    tables = _table_lines(lines)
    out = []
    for i, line in enumerate(lines):
        if line.lstrip().startswith("#"):
            line = _unbold(line)
        elif i in tables:
            line = table_row(line)
        out.append(line)
    # a blank line between two list items is extractor spacing, not a paragraph break
    out = [line for i, line in enumerate(out)
           if line or not (0 < i < len(out) - 1 and _LIST_ITEM.match(out[i - 1]) and _LIST_ITEM.match(out[i + 1]))]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip() + "\n" if text.strip() else ""
