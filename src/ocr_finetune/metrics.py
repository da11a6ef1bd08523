"""Scores for a transcription against its reference, after one documented, configurable normalisation.

- CER / WER: jiwer, on normalised text. Raw CER exceeds 1 when an output loops (insertions), so summaries
  also report the median and the mean of CER clipped at 1.
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

from .teachers.quality import repeat_fraction


def strip_markdown(text: str) -> str:
    """The text without Markdown syntax: headings, emphasis, list markers, table pipes and rules, links."""
    text = re.sub(r"<[^>]+>", " ", text)  # HTML tags (tables written as HTML)
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or m.group(2) or "", text)
    lines = []
    for line in text.splitlines():
        if re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", line):
            continue  # table separator row
        line = re.sub(r"^\s{0,3}#{1,6}\s+", "", line)
        line = re.sub(r"^\s*(?:[-*+•]|\d+[.)])\s+", "", line)
        line = line.replace("|", " ")
        line = re.sub(r"(\*\*|__|\*|_|`)(?=\S)(.+?)(?<=\S)\1", r"\2", line)
        lines.append(line)
    return "\n".join(lines)


def normalize_text(text: str, unicode: str = "NFC", collapse_whitespace: bool = True, markdown: str = "keep") -> str:
    """NFC by default (Korean typed as NFD otherwise scores CER > 2), Markdown kept or stripped, whitespace
    runs collapsed to one space, ends stripped."""
    text = text or ""
    if unicode != "none":
        text = unicodedata.normalize(unicode, text)
    if markdown == "strip":
        text = strip_markdown(text)
    return " ".join(text.split()) if collapse_whitespace else text.strip()


def _rate(measure, reference: str, hypothesis: str, **norm) -> float:
    ref, hyp = normalize_text(reference, **norm), normalize_text(hypothesis, **norm)
    if not ref:  # jiwer returns len(hyp) here; an empty page read as empty is perfect, anything else wrong
        return 0.0 if not hyp else 1.0
    return float(measure(ref, hyp))


def cer(reference: str, hypothesis: str, **norm) -> float:
    return _rate(jiwer.cer, reference, hypothesis, **norm)


def wer(reference: str, hypothesis: str, **norm) -> float:
    return _rate(jiwer.wer, reference, hypothesis, **norm)


def ned(reference: str, hypothesis: str, **norm) -> float:
    ref, hyp = normalize_text(reference, **norm), normalize_text(hypothesis, **norm)
    if not ref and not hyp:
        return 0.0
    return Levenshtein.distance(ref, hyp) / max(len(ref), len(hyp))


# ---------------------------------------------------------------- tables (TEDS)

class _Node:
    def __init__(self, tag: str, text: str = ""):
        self.tag, self.text, self.children = tag, text, []


class _TableConfig(Config):
    def rename(self, a, b):
        if a.tag != b.tag:
            return 1.0
        if a.tag == "td":  # cells: how different their contents are
            return Levenshtein.normalized_distance(a.text, b.text)
        return 0.0

    def children(self, node):
        return node.children


def _count(node) -> int:
    return 1 + sum(_count(c) for c in node.children)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Tables in Markdown pipe syntax or HTML, as rows of cell texts."""
    tables, current = [], []
    for line in (text or "").splitlines() + [""]:
        if line.strip().startswith("|") or (line.count("|") >= 2 and current):
            if not re.fullmatch(r"\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*", line):
                current.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
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
                self.cell = []

        def handle_endtag(self, tag):
            if tag in ("td", "th") and self.cell is not None:
                self.row.append(" ".join("".join(self.cell).split()))
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell.append(data)

    parser = Parser()
    parser.feed(text)
    return [t for t in parser.tables if t]


def _tree(tables: list[list[list[str]]]) -> _Node:
    root = _Node("tables")
    for table in tables:
        t = _Node("table")
        for row in table:
            tr = _Node("tr")
            tr.children = [_Node("td", cell) for cell in row]
            t.children.append(tr)
        root.children.append(t)
    return root


def teds(reference: str, hypothesis: str) -> float | None:
    """1 - tree edit distance / size of the larger tree, over all tables of the page; None without a
    reference table."""
    ref_tables = markdown_tables(reference)
    if not ref_tables:
        return None
    out_tables = markdown_tables(hypothesis)
    if not out_tables:
        return 0.0
    a, b = _tree(ref_tables), _tree(out_tables)
    distance = APTED(a, b, _TableConfig()).compute_edit_distance()
    return max(0.0, 1.0 - distance / max(_count(a), _count(b)))


# ---------------------------------------------------------------- per page and summaries

def page_scores(reference: str, hypothesis: str, loop_threshold: float = 0.5, **norm) -> dict:
    c = cer(reference, hypothesis, **norm)
    ref_chars = len(normalize_text(reference, **norm))
    score = {"cer": round(c, 4), "cer_clipped": round(min(c, 1.0), 4), "wer": round(wer(reference, hypothesis, **norm), 4),
             "ned": round(ned(reference, hypothesis, **norm), 4),
             "loop": repeat_fraction(hypothesis or "") >= loop_threshold,
             "length_ratio": round(len(normalize_text(hypothesis, **norm)) / ref_chars, 4) if ref_chars else None}
    table = teds(reference, hypothesis)
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
    return {"cer": cers["mean"], "cer_median": cers["median"],
            "cer_clipped": summarize([p["cer_clipped"] for p in pages])["mean"],
            "wer": summarize([p["wer"] for p in pages])["mean"], "ned": summarize([p["ned"] for p in pages])["mean"],
            "loop_rate": round(sum(p["loop"] for p in pages) / len(pages), 4) if pages else None,
            "length_ratio": summarize([p["length_ratio"] for p in pages])["median"],
            "teds": tables["mean"], "table_pages": tables["n"]}
