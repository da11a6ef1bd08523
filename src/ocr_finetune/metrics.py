"""Scores for a transcription against its reference, after one documented, configurable normalisation.

- CER / WER: jiwer, on normalised text. Raw CER exceeds 1 when an output loops (insertions), so summaries
  also report the median and the mean of CER clipped at 1. Summaries are means over pages (each page weighs
  the same); `cer_corpus` is the edits over all reference characters (each character weighs the same).
  WER splits words at whitespace: it says nothing for scripts written without spaces (Chinese, Japanese,
  Thai), where CER is the measure.
- NED: normalised edit distance, Levenshtein(ref, out) / max(len(ref), len(out)), in [0, 1]
  (OmniDocBench's text metric).
- TEDS: tree-edit-distance similarity of the tables (Zhong et al. 2020, as in OmniDocBench), for pages whose
  reference has a table; Markdown pipe tables and HTML tables are both read.
- loop: the output repeats itself (share of repeated word 8-grams at or above a threshold).
- length ratio: output characters / reference characters.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from html.parser import HTMLParser

import jiwer
from apted import APTED, Config
from rapidfuzz.distance import Levenshtein

from .teachers.quality import HTML_TAG, repeat_fraction


_TABLE_RULE = re.compile(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*")
# Emphasis only at word edges (CommonMark's rule for `_`, applied to `*` too): `my_func_name`, `2*3*4` are text;
# ASCII word edges only: `**注意**事项` is bold
_EMPHASIS = re.compile(r"(?<![A-Za-z0-9*_\\])(\*\*|__|\*|_)(?=\S)(.+?)(?<=\S)\1(?![A-Za-z0-9*_])")
# math ($...$) and code spans keep their `_` and `*` (content); code spans lose their backticks


def _unemphasise(text: str) -> str:
    for _ in range(3):  # ***both*** is two levels
        text, n = _EMPHASIS.subn(r"\2", text)
        if not n:
            break
    return text


def _strip_emphasis(line: str) -> str:
    parts, pos = [], 0
    # math as Pandoc reads it: `$` then no space, no space before the closing `$`, and no digit after it
    # (`$5 and $10` is money)
    for m in re.finditer(r"\$\$.+?\$\$|\$[^$\s](?:[^$\n]*[^$\s])?\$(?!\d)|`[^`\n]+`", line):
        parts.append(_unemphasise(line[pos:m.start()]))
        span = m.group(0)
        parts.append(span[1:-1] if span.startswith("`") else span)
        pos = m.end()
    parts.append(_unemphasise(line[pos:]))
    return "".join(parts)


def strip_markdown(text: str) -> str:
    """The text without Markdown syntax: headings, emphasis, bullets, table pipes and rules, links, HTML tags.
    What is printed on the page stays: ordered-list numbers, `_` and `*` inside words, math."""
    text = HTML_TAG.sub(" ", text)  # HTML tags (tables written as HTML)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or m.group(2) or "", text)
    lines = []
    for line in text.split("\n"):
        if _TABLE_RULE.fullmatch(line):
            continue  # table separator row
        line = re.sub(r"^\s{0,3}#{1,6}\s+", "", line)
        line = re.sub(r"^\s*[-*+•]\s+", "", line)
        line = line.replace("|", " ")
        lines.append(_strip_emphasis(line))
    return "\n".join(lines)


# Invisible format characters (zero-width space, BOM, soft hyphen, direction marks): nobody can read them off
# a page. ZWJ and ZWNJ stay: they change how Persian and Indic text is written.
_INVISIBLE_CHARS = ("\u00ad", "\u200b", "\u200e", "\u200f", "\u2060", "\ufeff", "\u061c", "\u202a", "\u202b",
                    "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068", "\u2069")
_INVISIBLE = {ord(c): None for c in _INVISIBLE_CHARS}


def normalize_text(text: str, unicode: str = "NFC", collapse_whitespace: bool = True, markdown: str = "keep") -> str:
    """NFC by default (Korean typed as NFD otherwise scores CER > 2), invisible format characters dropped,
    Markdown kept or stripped, whitespace runs collapsed to one space, ends stripped."""
    text = (text or "").translate(_INVISIBLE)
    if unicode != "none":
        text = unicodedata.normalize(unicode, text)
    if markdown == "strip":
        text = strip_markdown(text)
    return " ".join(text.split()) if collapse_whitespace else text.strip()


def display_text(text: str, unicode: str = "NFC", collapse_whitespace: bool = True, markdown: str = "keep") -> str:
    """The text the scores read, with its line breaks kept: what the report shows and diffs, so that what it
    marks is what CER counts."""
    text = normalize_text(text, unicode, False, markdown)
    if not collapse_whitespace:
        return text
    return "\n".join(line for line in (" ".join(x.split()) for x in text.split("\n")) if line)


def _rate(measure, reference: str, hypothesis: str, **norm) -> float:
    ref, hyp = normalize_text(reference, **norm), normalize_text(hypothesis, **norm)
    if not ref:  # jiwer returns len(hyp) here; an empty page read as empty is perfect, anything else wrong
        return 0.0 if not hyp else 1.0
    return float(measure(ref, hyp))


def cer(reference: str, hypothesis: str, **norm) -> float:
    return _rate(jiwer.cer, reference, hypothesis, **norm)


def wer(reference: str, hypothesis: str, **norm) -> float:
    """Words are split at any whitespace (jiwer splits at spaces only, so a line break would join two words).
    Scripts written without spaces (Chinese, Japanese, Thai) have no words to count: read CER there."""
    return _rate(lambda r, h: jiwer.wer(" ".join(r.split()), " ".join(h.split())), reference, hypothesis, **norm)


def ned(reference: str, hypothesis: str, **norm) -> float:
    ref, hyp = normalize_text(reference, **norm), normalize_text(hypothesis, **norm)
    if not ref and not hyp:
        return 0.0
    return Levenshtein.distance(ref, hyp) / max(len(ref), len(hyp))


# ---------------------------------------------------------------- tables (TEDS)

class Cell(str):
    """A table cell's text, with its HTML spans (1 and 1 for Markdown, which has none)."""

    colspan: int = 1
    rowspan: int = 1


class _Node:
    def __init__(self, tag: str, text: str = "", spans: tuple[int, int] = (1, 1)):
        self.tag, self.text, self.spans, self.children = tag, text, spans, []


class _TableConfig(Config):
    def rename(self, a, b):
        if a.tag != b.tag or a.spans != b.spans:  # a merged cell against two is a structure error (as in TEDS)
            return 1.0
        if a.tag == "td":  # cells: how different their contents are
            return Levenshtein.normalized_distance(a.text, b.text)
        return 0.0

    def children(self, node):
        return node.children


def _count(node) -> int:
    return 1 + sum(_count(c) for c in node.children)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Tables in Markdown pipe syntax (GFM: a header row over a delimiter row, with or without outer pipes,
    then its body rows) or HTML, as rows of cell texts. A line that merely starts with `|` (`|x| = 3`) is
    prose: without a delimiter row under it, no table starts."""
    tables, current = [], None
    lines = (text or "").split("\n")
    for i, line in enumerate(lines):
        if current is not None:
            if "|" in line and line.strip():
                if not _TABLE_RULE.fullmatch(line):
                    current.append([c.strip() for c in line.strip().strip("|").split("|")])
                continue
            tables.append(current)
            current = None
        rule = lines[i + 1] if i + 1 < len(lines) else ""
        if "|" in line and "|" in rule and _TABLE_RULE.fullmatch(rule) and not _TABLE_RULE.fullmatch(line):
            current = [[c.strip() for c in line.strip().strip("|").split("|")]]
    if current:
        tables.append(current)
    tables += _html_tables(text or "")
    return tables


def _html_tables(text: str) -> list[list[list[str]]]:
    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.row, self.cell = [], None, None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr" and self.tables:
                self.row = []
                self.tables[-1].append(self.row)
            elif tag in ("td", "th") and self.row is not None:
                self.cell, self.spans = [], {k: v for k, v in attrs if k in ("colspan", "rowspan")}

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                cell = Cell(" ".join("".join(self.cell).split()))
                for key, value in self.spans.items():
                    setattr(cell, key, int(value) if (value or "").strip().isdigit() else 1)
                self.row.append(cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Parser()
    parser.feed(text)
    return [t for t in parser.tables if t]


def _tree(tables: list[list[list[str]]], cells_as_rows: bool = False) -> _Node:
    root = _Node("tables")
    for table in tables:
        t = _Node("table")
        for row in table:
            tr = _Node("tr")
            tr.children = ([_Node("td", " | ".join(row))] if cells_as_rows else
                           [_Node("td", cell, (getattr(cell, "colspan", 1), getattr(cell, "rowspan", 1)))
                            for cell in row])
            t.children.append(tr)
        root.children.append(t)
    return root


# APTED is pure Python and grows about with the cube of the tree: 400 cells took 3 s, 1,600 cells 70 s. Larger
# pages are scored with each row as one cell (its cells joined), which keeps rows and their text.
TEDS_MAX_CELLS = 600


def teds(reference: str, hypothesis: str, **norm) -> float | None:
    """1 - tree edit distance / size of the larger tree, over all tables of the page, cells normalised as the
    text is; None without a reference table."""
    def normalized(cell):
        out = Cell(normalize_text(cell, **{**norm, "collapse_whitespace": True}))
        out.colspan, out.rowspan = getattr(cell, "colspan", 1), getattr(cell, "rowspan", 1)
        return out

    def tables(text):
        return [[[normalized(cell) for cell in row] for row in table] for table in markdown_tables(text)]

    ref_tables = tables(reference)
    if not ref_tables:
        return None
    out_tables = tables(hypothesis)
    if not out_tables:
        return 0.0
    cells = max(sum(len(row) for t in ts for row in t) for ts in (ref_tables, out_tables))
    a, b = (_tree(ts, cells_as_rows=cells > TEDS_MAX_CELLS) for ts in (ref_tables, out_tables))
    distance = APTED(a, b, _TableConfig()).compute_edit_distance()
    return max(0.0, 1.0 - distance / max(_count(a), _count(b)))


# ---------------------------------------------------------------- per page and summaries

def page_scores(reference: str, hypothesis: str, loop_threshold: float = 0.5, **norm) -> dict:
    c = cer(reference, hypothesis, **norm)
    ref_chars = len(normalize_text(reference, **norm))
    score = {"cer": round(c, 4), "cer_clipped": round(min(c, 1.0), 4), "ref_chars": ref_chars, "wer": round(wer(reference, hypothesis, **norm), 4),
             "ned": round(ned(reference, hypothesis, **norm), 4),
             "loop": repeat_fraction(hypothesis or "") >= loop_threshold,
             "length_ratio": round(len(normalize_text(hypothesis, **norm)) / ref_chars, 4) if ref_chars else None}
    table = teds(reference, hypothesis, **norm)
    if table is not None:
        score["teds"] = round(table, 4)
    return score


def summarize(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)}


def summarize_system(pages: list[dict]) -> dict:
    """One system's scores over pages (each a page_scores dict)."""
    cers = summarize([p["cer"] for p in pages])
    tables = summarize([p.get("teds") for p in pages])
    weights = [(p["cer"], p.get("ref_chars")) for p in pages if p.get("ref_chars")]
    # every character counts once: a dense page weighs more than a cover page (the mean weighs pages equally)
    corpus = round(sum(c * n for c, n in weights) / sum(n for _, n in weights), 4) if weights else None
    return {"cer": cers["mean"], "cer_median": cers["median"], "cer_corpus": corpus,
            "cer_clipped": summarize([p["cer_clipped"] for p in pages])["mean"],
            "wer": summarize([p["wer"] for p in pages])["mean"], "ned": summarize([p["ned"] for p in pages])["mean"],
            "loop_rate": round(sum(p["loop"] for p in pages) / len(pages), 4) if pages else None,
            "length_ratio": summarize([p["length_ratio"] for p in pages])["median"],
            "teds": tables["mean"], "table_pages": tables["n"]}
