"""Small, explicit clean-ups of Markdown produced by extractors and models."""

from __future__ import annotations

import re

_BOLD = re.compile(r"\*\*(.+?)\*\*")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)]) ")


def _unbold(s: str) -> str:
    return _BOLD.sub(r"\1", s)


def table_row(line: str) -> str:
    """One canonical spelling of a Markdown table row: `| a | b |`, separator rows as `|---|---|`."""
    cells = [_unbold(c).strip() for c in line.strip().strip("|").split("|")]
    if all(re.fullmatch(r":?-{3,}:?", c) for c in cells):
        return "|" + "|".join(c.replace("-" * len(c.strip(":")), "---") for c in cells) + "|"
    return "| " + " | ".join(cells) + " |"


def clean_markdown(md: str) -> str:
    """Normalise extractor quirks that carry no content.

    pymupdf4llm wraps headings and table header cells in `**` (the PDF used a bold font), leaves a blank line
    between list items and trailing spaces on every line. A model trained on those labels would learn the
    noise, so they are removed here; everything else (nesting, tables, order) is kept as extracted.
    """
    out = []
    for line in md.replace("\r\n", "\n").split("\n"):
        line = line.rstrip()
        if line.lstrip().startswith("#"):
            line = _unbold(line)
        elif line.lstrip().startswith("|"):
            line = table_row(line)
        out.append(line)
    # a blank line between two list items is extractor spacing, not a paragraph break
    out = [line for i, line in enumerate(out)
           if line or not (0 < i < len(out) - 1 and _LIST_ITEM.match(out[i - 1]) and _LIST_ITEM.match(out[i + 1]))]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))
    return text.strip() + "\n" if text.strip() else ""
