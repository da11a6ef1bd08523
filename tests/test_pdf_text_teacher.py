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


# ---------------------------------------------------------------- tables without rules

def _cells(table):
    """A table's rows as (text, colspan) per cell: GFM and HTML alike."""
    return [[(str(c), getattr(c, "colspan", 1)) for c in row] for row in table]


def _traced(pdf_bytes_or_path):
    """The page's label and the reasons the unruled-table detector gave for each run it took for no table."""
    from ocr_finetune.teachers import text_layer

    doc = pymupdf.open(pdf_bytes_or_path) if isinstance(pdf_bytes_or_path, Path) else \
        pymupdf.open("pdf", pdf_bytes_or_path)
    text_layer.UNRULED_TRACE = []
    try:
        return text_layer.page_text(doc[0]).text, [reason for reason, _ in text_layer.UNRULED_TRACE]
    finally:
        text_layer.UNRULED_TRACE = None


def test_unruled_tables_come_out_as_tables_cell_for_cell(run):
    # columns only as aligned white space: left-aligned text, right-aligned numbers, a centred column
    shapes = {"unruled_price_list": (6, 4), "unruled_schedule": (6, 3), "unruled_statement": (7, 3)}
    for name, table in rc.UNRULED_TABLES.items():
        row = run["rows"][name]
        text = row["label"].text
        found = markdown_tables(text)
        assert len(found) == 1, (name, text)
        assert _cells(found[0]) == _cells(markdown_tables(table.markdown())[0]), (name, text)
        rows, cols = shapes[name]
        assert len(found[0]) == rows and max(sum(cs for _, cs in r) for r in _cells(found[0])) == cols, name
        assert row["score"]["teds"] == 1.0 and row["score"]["cer"] < 0.01, (name, text)
        # the prose above and below is no row of it
        blocks = text.strip().split("\n\n")
        table_at = next(i for i, b in enumerate(blocks) if "<table" in b or "|---" in b)
        assert blocks[table_at - 1] == row["truth"].split("\n\n")[1] and len(blocks) == table_at + 2, (name, text)
    schedule = run["rows"]["unruled_schedule"]["label"].text.splitlines()
    # the session title wrapped onto a second line in its column is one cell; it adds no row
    assert "| 09:30 | Opening remarks and welcome by the programme committee | Hall A |" in schedule
    assert "| 11:30 | Tables without rules | Hall A |" in schedule
    assert "| Envelopes C5 | pack | 6.75 | 1,300 |" in run["rows"]["unruled_price_list"]["label"].text
    # a header centred over both year columns: HTML, as the ruled path writes merged cells
    statement = run["rows"]["unruled_statement"]["label"].text
    assert '<tr><td></td><td colspan="2">Year ended 31 December</td></tr>' in statement
    assert "<tr><td>Cost of sales</td><td>(905)</td><td>(900)</td></tr>" in statement
    for name in rc.UNRULED_TABLES:  # plain get_text() reads them column by column or word by word
        assert run["rows"][name]["plain_score"].get("teds", 0.0) < 0.5


def test_aligned_lines_that_are_no_tables_stay_text(run, corpus):
    # key: value lines at a tab stop: two aligned columns over five lines, read as lines, label by value
    row = run["rows"]["unruled_key_values"]
    blocks = row["label"].text.strip().split("\n\n")
    assert markdown_tables(row["label"].text) == [] and row["score"]["cer"] < 0.01, row["label"].text
    assert blocks[1:1 + len(rc.KEY_VALUES)] == [f"{k} {v}" for k, v in rc.KEY_VALUES]
    assert _traced(corpus / "pdfs" / "unruled_key_values.pdf")[1] == ["key: value lines"]
    # justified prose whose stretched spaces leave gutters over three lines: seen, and refused
    row = run["rows"]["prose_wide_gaps"]
    assert markdown_tables(row["label"].text) == [] and row["score"]["cer"] < 0.01, row["label"].text
    assert _traced(corpus / "pdfs" / "prose_wide_gaps.pdf")[1], "the run of wide gaps was not even a candidate"


def test_two_column_pages_stay_two_reading_columns(corpus):
    # the demo's two-column newsletter: its columns run side by side line by line (the shape of a two-column
    # table), and are read one after the other
    from conftest import ROOT

    text, reasons = _traced(ROOT / "data" / "samples" / "pdfs" / "two_column_news.pdf")
    assert markdown_tables(text) == [] and ("prose columns" in reasons or "two text columns" in reasons), reasons
    blocks = text.strip().split("\n\n")
    assert [b for b in blocks if b.startswith("## ")] == ["## Garden Project", "## Library Hours"]
    assert blocks.index("More planting days are planned for the spring.") < blocks.index("## Library Hours")
    for name in MULTI_COLUMN:  # the corpus's two-column pages likewise
        text, reasons = _traced(corpus / "pdfs" / f"{name}.pdf")
        assert markdown_tables(text) == [] or name in rc.TABLE_DOCS, name
        assert "prose columns" in reasons or "two text columns" in reasons, (name, reasons)


def _page(draw) -> bytes:
    doc = pymupdf.open()
    draw(doc.new_page(width=rc.PAGE_W, height=rc.PAGE_H))
    return doc.tobytes()


def test_lists_displays_and_a_table_at_body_leading():
    helv = pymupdf.Font("helv")

    def numbered_list(page):  # numbers in a column of their own, the items at a hanging indent
        for i, item in enumerate(["Open the valve slowly.", "Wait two minutes.", "Close the valve again.",
                                  "Write down the reading."]):
            page.insert_text((56, 100 + 16 * i), f"{i + 1}.", fontsize=10)
            page.insert_text((80, 100 + 16 * i), item, fontsize=10)

    def displays(page):  # numbered formulas one under another: the numbers flush right
        for i, formula in enumerate(["a = b + c", "d = e - f", "g = h + k"]):
            page.insert_text((250, 100 + 16 * i), formula, fontname="tiro", fontsize=10)
            page.insert_text((520, 100 + 16 * i), f"({i + 1})", fontname="tiro", fontsize=10)

    def glued(page):  # a table set at the body's leading between two paragraphs, header not bold
        page.insert_text((56, 80), "The figures for the last three years are as follows.", fontsize=10)
        for i, cells in enumerate([("Year", "Members", "Fee"), ("2023", "1,204", "12.50"),
                                   ("2024", "1,377", "12.50"), ("2025", "1,410", "14.00")]):
            page.insert_text((56, 92 + 12 * i), cells[0], fontsize=10)
            for right, cell in zip((250, 350), cells[1:]):
                page.insert_text((right - helv.text_length(cell, fontsize=10), 92 + 12 * i), cell, fontsize=10)
        page.insert_text((56, 140), "Fees are per year and include the newsletter.", fontsize=10)

    for draw, reason in ((numbered_list, "list"), (displays, "numbered displays")):
        text, reasons = _traced(_page(draw))
        assert markdown_tables(text) == [] and reasons == [reason], (text, reasons)
    text, _ = _traced(_page(glued))
    assert _cells(markdown_tables(text)[0]) == [[("Year", 1), ("Members", 1), ("Fee", 1)],
                                                [("2023", 1), ("1,204", 1), ("12.50", 1)],
                                                [("2024", 1), ("1,377", 1), ("12.50", 1)],
                                                [("2025", 1), ("1,410", 1), ("14.00", 1)]], text
    assert text.startswith("The figures for the last three years are as follows.\n\n| Year |")
    assert text.rstrip().endswith("|\n\nFees are per year and include the newsletter."), text
