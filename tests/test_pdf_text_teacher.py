"""The text-layer teacher on the regression corpus (issue 18): each failure class measured against the truth
drawn from the same source, and against plain `page.get_text()` on the same pages."""

import time
from pathlib import Path

import pymupdf
import pytest

from ocr_finetune import regression_corpus as rc
from ocr_finetune.markdown import clean_markdown
from ocr_finetune.metrics import cer, markdown_tables
from ocr_finetune.teachers.base import PageInput
from ocr_finetune.teachers.pdf_text import POOL_MIN_PAGES, PdfTextTeacher
from ocr_finetune.teachers.reading_order import reading_order

MULTI_COLUMN = ("two_columns_formula", "two_columns_table", "two_columns_figure", "latex_booktabs", "latex_hlines",
                "latex_formulas", "ruled_prose")


def inputs(corpus):
    return [PageInput(name, 1, Path(f"{name}_p1.png"), corpus / "pdfs" / f"{name}.pdf") for name in rc.DOCUMENTS]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("regression")
    rc.write_corpus(out)
    return out


@pytest.fixture(scope="module")
def run(corpus):
    """Per document: truth, the teacher's label, plain get_text(), and both scored."""
    start = time.perf_counter()
    labels = list(PdfTextTeacher(workers=1).label(inputs(corpus)))
    seconds = time.perf_counter() - start
    rows = {}
    for label in labels:
        truth = (corpus / "truth" / f"{label.doc}_p1.md").read_text(encoding="utf-8")
        with pymupdf.open(corpus / "pdfs" / f"{label.doc}.pdf") as doc:
            plain = doc[0].get_text()
        rows[label.doc] = {"label": label, "truth": truth, "plain": plain,
                           "score": rc.page_score(truth, label.text if label.status == "labeled" else None),
                           "plain_score": rc.page_score(truth, plain)}
    return {"rows": rows, "seconds": seconds}


def test_mean_cer_is_below_plain_get_text_on_the_same_pages(run):
    labeled = [r for r in run["rows"].values() if r["label"].status == "labeled"]
    assert len(labeled) == len(rc.DOCUMENTS) - len(rc.EXPECTED)
    ours = rc.summary([r["score"] for r in labeled])
    plain = rc.summary([r["plain_score"] for r in labeled])
    assert ours["cer_mean"] < plain["cer_mean"], (ours, plain)
    assert ours["cer_mean"] < 0.02, {k: r["score"]["cer"] for k, r in run["rows"].items() if r["score"]["labeled"]}


def test_columns_come_out_whole_around_full_width_elements(run):
    for name in MULTI_COLUMN:
        score, plain = run["rows"][name]["score"], run["rows"][name]["plain_score"]
        assert score["inversions"] == 0 and score["runs_missing"] == 0, (name, run["rows"][name]["label"].text)
        assert plain["inversions"] > 0  # the corpus draws lines across both columns: order must come from positions
    assert rc.summary([r["score"] for r in run["rows"].values()])["inversions"] == 0


def test_reading_order_of_aligned_columns_with_a_wide_element_between():
    left = [(50, y, 280, y + 10) for y in range(100, 200, 14)]
    right = [(300, y, 540, y + 10) for y in range(100, 200, 14)]
    wide = [(150, 210, 450, 240)]
    below_left, below_right = [(50, 250, 280, 260)], [(300, 250, 540, 260)]
    boxes = right + below_right + wide + left + below_left  # any input order
    order = [boxes[i] for i in reading_order(boxes)]
    assert order == left + right + wide + below_left + below_right
    # a short line under two tables side by side is the text below both, not the left table's column
    tables, line = [(50, 100, 250, 200), (320, 100, 540, 200)], (50, 210, 200, 220)
    assert reading_order(tables + [line], [True, True, False]) == [0, 1, 2]
    assert reading_order(tables + [line]) == [0, 2, 1]  # read as columns of text, it would be


def test_tables_one_per_printed_table_cells_as_printed(run):
    for name in rc.TABLE_DOCS:
        row = run["rows"][name]
        assert row["score"]["teds"] >= 0.85, (name, row["label"].text)
        assert len(markdown_tables(row["label"].text)) == len(markdown_tables(row["truth"])), name
        assert row["score"]["teds"] > row["plain_score"].get("teds", 0.0)
    merged = run["rows"]["merged_cells"]["label"].text
    assert 'rowspan="2"' in merged and 'colspan="2"' in merged and "<td>base model without adapter" not in merged
    assert '<td rowspan="2">base model without adapter</td>' in merged  # one cell, its lines joined


def test_latex_tables_ruled_only_across_are_tables_with_caption_and_text_outside(run):
    # booktabs (rules of two weights, a \multicolumn header over a \cmidrule) at column width, and \hline
    # without vertical bars across both columns: no vertical line anywhere, columns only as white space
    for name, caption in (("latex_booktabs", rc.BOOKTABS_CAPTION), ("latex_hlines", rc.HLINES_CAPTION)):
        row = run["rows"][name]
        text, blocks = row["label"].text, row["label"].text.split("\n\n")
        assert row["score"]["teds"] >= 0.85 and row["score"]["cer"] < 0.01, (name, text)
        assert len(markdown_tables(text)) == 1, (name, text)
        assert caption in blocks and blocks.index(caption) + 1 == next(i for i, b in enumerate(blocks)
                                                                     if "<table" in b or "|---" in b)
        table = next(b for b in blocks if "<table" in b or "|---" in b)
        assert caption[:8] not in table and "seeds" not in table and "theses" not in table, (name, table)
    assert '<td colspan="2">Accuracy</td>' in run["rows"]["latex_booktabs"]["label"].text
    assert "| Annual reports | 860 | 1,045 | 0.034 | 0.874 |" in run["rows"]["latex_hlines"]["label"].text


def test_no_table_where_none_is_printed(run):
    # every page without a table, among them prose between rules of one width (running head, a ruled
    # abstract, the footnote rule) in two columns: the shape of a table ruled only across
    for name, row in run["rows"].items():
        if name not in rc.TABLE_DOCS and row["label"].status == "labeled":
            assert markdown_tables(row["label"].text) == [], (name, row["label"].text)
    assert run["rows"]["ruled_prose"]["score"]["cer"] < 0.01


def test_numbered_displays_in_a_column_and_across_the_page(run):
    row = run["rows"]["latex_formulas"]
    blocks = row["label"].text.strip().split("\n\n")
    assert row["score"]["inversions"] == 0 and row["score"]["runs_missing"] == 0, row["label"].text
    assert row["plain_score"]["inversions"] > 0
    # the two-line display in the left column with its number (1), the wide one with (2): one block each
    assert rc.numbered_latex(rc.COLUMN_FORMULA, 1) in blocks and rc.numbered_latex(rc.WIDE_FORMULA, 2) in blocks
    assert "(1)" not in blocks and "(2)" not in blocks


def test_formula_as_latex_scripts_without_extractor_markup(run):
    text = run["rows"]["two_columns_formula"]["label"].text
    assert rc.formula_latex(rc.FORMULA) in text.split("\n")
    for row in run["rows"].values():
        label = row["label"].text or ""
        assert not any(m in label for m in ("<sup>", "<sub>", "<u>", "~~", "<mark>", "<br")), label


def test_word_spaces_come_from_glyph_positions(run):
    for name in ("korean_positional", "tight_latin"):
        row = run["rows"][name]
        assert " " not in "".join(row["plain"].split("\n")[1:])  # the text layer has no space characters
        assert row["score"]["cer"] < 0.01 < row["plain_score"]["cer"], (name, row["label"].text)


def test_prose_lines_starting_with_a_bar_are_no_tables(run):
    text = run["rows"]["pipe_prose"]["label"].text
    for line in rc.PIPE_LINES:
        assert line in text.split("\n")
    assert markdown_tables(text) == [] and clean_markdown(text) == text


def test_pages_without_a_usable_text_layer_say_why_and_no_label_holds_unmapped_glyphs(run):
    for name, (status, word) in rc.EXPECTED.items():
        label = run["rows"][name]["label"]
        assert label.status == status and label.text is None and word in label.reason.lower(), (name, label)
    assert rc.summary([r["score"] for r in run["rows"].values()])["labels_with_unmapped"] == 0
    recovered = run["rows"]["no_unicode_recoverable"]
    assert recovered["label"].status == "labeled" and recovered["score"]["cer"] < 0.01
    assert recovered["plain_score"]["cer"] > 0.5  # get_text() gives glyph ids for letters there


def test_pool_keeps_order_and_isolates_failures(corpus, run, tmp_path):
    pages = inputs(corpus) * 2
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    pages.insert(5, PageInput("broken", 1, Path("broken_p1.png"), broken))
    pages.insert(9, PageInput("blank", 7, Path("blank_p7.png"), corpus / "pdfs" / "blank.pdf"))  # no page 7
    assert len(pages) >= POOL_MIN_PAGES
    start = time.perf_counter()
    pooled = list(PdfTextTeacher(workers=2).label(pages))
    assert time.perf_counter() - start < 20
    single = list(PdfTextTeacher(workers=1).label(pages))
    assert pooled == single
    by_key = {(x.doc, x.page): x for x in pooled}
    assert by_key[("broken", 1)].status == "failed" and by_key[("blank", 7)].status == "failed"
    assert by_key[("blank", 1)].status == "unlabeled"  # the bad page next to it failed alone
    assert sum(x.status == "failed" for x in pooled) == 2
    assert [x.text for x in pooled if x.doc == "tight_latin"] == [run["rows"]["tight_latin"]["label"].text] * 2


def test_speed_on_digital_pages(run):
    # the regression corpus is table- and font-heavy; >= 5 pages/s per core is the bar
    assert len(run["rows"]) / run["seconds"] >= 5


def test_demo_corpus_labels_keep_their_quality():
    from conftest import ROOT

    samples = ROOT / "data" / "samples"
    pages = [PageInput(p.stem, i + 1, Path(f"{p.stem}_p{i + 1}.png"), p)
             for p in sorted((samples / "pdfs").glob("*.pdf")) for i in range(len(pymupdf.open(p)))]
    for label in PdfTextTeacher(workers=1).label(pages):
        if label.status == "labeled":
            truth = (samples / "truth" / f"{label.doc}_p{label.page}.md").read_text(encoding="utf-8")
            assert cer(truth, label.text) < 0.01, (label.doc, label.page, label.text)
