"""metrics/report.html: one self-contained page where a person checks the scores with their own eyes.

Per page, worst first: the page image (embedded), the reference, and each system's output with the
character-level differences from the reference marked (deleted reference text struck through in red,
inserted text in green). The summary table comes first. No scripts, no external files: it opens offline
and can be attached to a pull request or an MLflow run as is.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from PIL import Image
from rapidfuzz.distance import Levenshtein

from .metrics import display_text

STYLE = """
body { font-family: system-ui, "Noto Sans", "Noto Sans CJK KR", "Noto Sans KR", "NanumGothic", "Apple SD Gothic Neo",
       "Malgun Gothic", "Noto Sans CJK JP", "Noto Sans CJK SC", sans-serif; margin: 24px; color: #222; }
table.summary { border-collapse: collapse; margin-bottom: 24px; }
table.summary td, table.summary th { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
table.summary th:first-child, table.summary td:first-child { text-align: left; }
.page { display: grid; grid-template-columns: 360px 1fr; gap: 16px; border-top: 2px solid #888;
        padding: 16px 0; }
.page img { width: 360px; border: 1px solid #ccc; }
.texts { display: grid; grid-template-columns: repeat(3, minmax(0, 1fr)); gap: 12px; align-items: start; }
.text { white-space: pre-wrap; font-size: 12px; background: #fafafa;
        font-family: ui-monospace, "DejaVu Sans Mono", "Noto Sans Mono CJK KR", "NanumGothicCoding", "D2Coding",
        "Noto Sans CJK KR", "NanumGothic", "Malgun Gothic", monospace;
        border: 1px solid #ddd; padding: 8px; max-height: 480px; overflow: auto; }
h3 { margin: 0 0 6px 0; font-size: 14px; }
del { background: #ffd7d5; color: #82071e; }
ins { background: #d2f4d3; color: #055d20; text-decoration: none; }
.score { color: #555; font-weight: normal; }
.better { color: #055d20; font-weight: bold; }
.worse { color: #82071e; font-weight: bold; }
"""


def char_diff(reference: str, output: str, any_whitespace_equal: bool = False) -> str:
    """HTML of `output` against `reference`: equal text plain, reference-only <del>, output-only <ins>.
    any_whitespace_equal: a line break against a space is no difference (the scores collapse whitespace)."""
    parts = []
    # rapidfuzz's Levenshtein alignment: the edits CER counts, and fast (difflib took 36 s on a 30k-character page)
    for op, a0, a1, b0, b1 in Levenshtein.opcodes(reference, output):
        same_space = op == "replace" and reference[a0:a1].isspace() and output[b0:b1].isspace()
        if op == "equal" or (same_space and any_whitespace_equal):
            parts.append(html.escape(output[b0:b1]))
            continue
        if a1 > a0:
            parts.append(f"<del>{html.escape(reference[a0:a1])}</del>")
        if b1 > b0:
            parts.append(f"<ins>{html.escape(output[b0:b1])}</ins>")
    return "".join(parts)


def embedded_image(path: str | Path, width: int = 720) -> str:
    """The page as a JPEG data URL, scaled down: the report stays one file of a reasonable size."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.width > width:
            im = im.resize((width, round(im.height * width / im.width)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


# how to read each score: lower is better for the error rates, higher for TEDS, 1 is right for the length ratio
BETTER = {"cer": "lower", "cer_median": "lower", "cer_clipped": "lower", "cer_corpus": "lower", "wer": "lower",
          "ned": "lower", "teds": "higher", "loop_rate": "lower", "length_ratio": "closer to 1"}


def summary_table(summary: dict, systems: list[str]) -> str:
    """One column per system on the held-out pages, and the change base -> fine-tuned; then the same on the
    trained-on pages (when read). Each row says which way is better."""
    blocks = [("held out", summary)] + ([("trained on", summary["seen"])] if "seen" in summary else [])
    head = "".join(f"<th>{html.escape(s)}, {name} ({scores['pages']} pages)</th>" for name, scores in blocks
                   for s in [*systems, *(["change"] if len(systems) == 2 else [])])
    rows = []
    for k, better in BETTER.items():
        cells = []
        for _, scores in blocks:
            values = [scores[s].get(k) for s in systems]
            cells += [f"<td>{_fmt(v)}</td>" for v in values]
            if len(systems) == 2:
                cells.append(f"<td>{_change(values[0], values[1], better)}</td>")
        rows.append(f"<tr><td>{k} <span class=\"score\">({better} is better)</span></td>{''.join(cells)}</tr>")
    return f'<table class="summary"><tr><th>metric</th>{head}</tr>{"".join(rows)}</table>'


def _change(base, tuned, better: str) -> str:
    """The change base -> fine-tuned, marked better or worse by the metric's direction."""
    if base is None or tuned is None:
        return "–"
    delta = tuned - base
    if better == "closer to 1":
        gain = abs(base - 1) - abs(tuned - 1)
    else:
        gain = -delta if better == "lower" else delta
    mark = ' class="better"' if gain > 1e-9 else ' class="worse"' if gain < -1e-9 else ""
    return f"<span{mark}>{delta:+.4f}</span>"


def _describe(norm: dict) -> str:
    unicode = norm.get("unicode", "NFC")
    return ", ".join([f"Unicode {unicode}" if unicode != "none" else "Unicode as written",
                      "Markdown syntax stripped" if norm.get("markdown") == "strip" else "Markdown kept",
                      "whitespace runs as one space" if norm.get("collapse_whitespace", True) else "whitespace kept",
                      "invisible format characters dropped"])


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))


def write_report(result: dict, out_path: str | Path, title: str = "ocr-finetune evaluation") -> Path:
    """result: evaluate()'s (each page row names its image)."""
    summary, pages = result["summary"], result["pages"]
    systems = [s for s in ("base", "finetuned") if s in summary]
    worst = systems[-1]
    # held-out pages first, then the trained-on ones; each worst first
    ordered = sorted(pages, key=lambda p: (p.get("split") == "seen", -(p[worst]["cer"] or 0)))
    norm = result.get("normalization", {})
    collapse = norm.get("collapse_whitespace", True)
    blocks = []
    for p in ordered:
        reference = display_text(p["reference"], **norm)
        texts = [f'<div><h3>reference</h3><div class="text">{html.escape(reference)}</div></div>']
        for s in systems:
            scores = p[s]
            label = f'CER {scores["cer"]:.3f} · NED {scores["ned"]:.3f}' + (
                f' · TEDS {scores["teds"]:.3f}' if "teds" in scores else "") + (" · LOOP" if scores["loop"] else "")
            texts.append(f'<div><h3>{s} <span class="score">{label}</span></h3>'
                         f'<div class="text">{char_diff(reference, display_text(p[s]["output"], **norm), collapse)}</div></div>')
        image = p.get("image")
        img = f'<img src="{embedded_image(image)}" alt="{html.escape(p["doc"])} page {p["page"]}">' if image else ""
        split = " · trained on" if p.get("split") == "seen" else " · held out"
        blocks.append(f'<section class="page"><div><h3>{html.escape(p["doc"])} · page {p["page"]}{split}</h3>{img}</div>'
                      f'<div class="texts">{"".join(texts)}</div></section>')
    doc = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
           f"<p>{summary['pages']} held-out pages from {summary['docs']} documents"
           + (f", then {summary['seen']['pages']} of the pages the adapter trained on (how well it learned them, "
              "not how it generalises)" if "seen" in summary else "")
           + f"; worst first by {worst} CER. "
           f"<del>struck</del>: in the reference, missing from the output; <ins>green</ins>: in the output only. "
           f"Texts as scored: {html.escape(_describe(norm))}."
           + (f" Model: {html.escape(str(result['model'].get('base')))}" if result.get("model") else "")
           + (f"; adapter: {html.escape(str(result['adapter']))}" if result.get("adapter") else "")
           + (f"; MLflow run: {html.escape(str(result['mlflow_run_id']))}" if result.get("mlflow_run_id") else "")
           + "."
           f"</p>{summary_table(summary, systems)}{''.join(blocks)}</body></html>")
    out_path = Path(out_path)
    out_path.write_text(doc, encoding="utf-8")
    return out_path
