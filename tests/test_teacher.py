import pytest

from conftest import ROOT
from ocr_finetune.markdown import clean_markdown
from ocr_finetune.metrics import cer
from ocr_finetune.params import Params
from ocr_finetune.pdf import render_pages
from ocr_finetune.teachers import get_teacher, label_pages, read_labels, teacher_quality

SAMPLES = ROOT / "data" / "samples"


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("labels")
    render_pages(SAMPLES / "pdfs", tmp / "pages", dpi=30, progress=False)
    labels = label_pages(get_teacher(Params()), tmp / "pages", SAMPLES / "pdfs", tmp / "labels",
                         progress=False)
    assert read_labels(tmp / "labels" / "labels.jsonl") == labels
    return {(x.doc, x.page): x for x in labels}


def truth(doc, page):
    return (SAMPLES / "truth" / f"{doc}_p{page}.md").read_text(encoding="utf-8")


def test_tables_come_out_as_markdown_tables(labels):
    for key in [("price_table", 1), ("annual_report", 2), ("bilingual_schedule", 1)]:
        table_rows = [line for line in truth(*key).splitlines() if line.startswith("|")]
        assert table_rows
        for row in table_rows:  # every row of the truth's table, cell for cell
            assert row in labels[key].text.splitlines(), (key, row, labels[key].text)


def test_headings_lists_and_korean_survive(labels):
    memo = labels[("korean_memo", 1)].text
    assert memo.startswith("# 업무 안내문")
    assert "## 일정" in memo and "- 1차 교육: 3월 11일" in memo
    assert cer(truth("korean_memo", 1), memo) < 0.02


def test_image_only_page_is_unlabeled_never_empty(labels):
    scan = labels[("scanned_letter", 1)]
    assert scan.status == "unlabeled" and scan.text is None and "text layer" in scan.reason
    assert all(x.text and x.text.strip() for x in labels.values() if x.status == "labeled")


def test_teacher_quality_against_ground_truth(labels):
    q = teacher_quality(list(labels.values()), SAMPLES / "truth")
    assert q["labeled"] == len(labels) - 1 and q["unlabeled"] == 1
    assert q["cer"]["n"] == q["labeled"]
    assert q["cer"]["median"] <= 0.01 and q["cer"]["mean"] < 0.1
    assert teacher_quality(list(labels.values()), None)["cer"] is None  # users without truth still get counts


def test_unreadable_pdf_is_recorded_as_failed(tmp_path):
    render_pages(SAMPLES / "pdfs" / "price_table.pdf", tmp_path / "pages", dpi=30, progress=False)
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs" / "price_table.pdf").write_bytes(b"garbage")
    out = label_pages(get_teacher(Params()), tmp_path / "pages", tmp_path / "pdfs", tmp_path / "labels",
                      progress=False)
    assert [x.status for x in out] == ["failed"] and "price_table.pdf" in out[0].reason


def test_clean_markdown_removes_extractor_noise_only():
    raw = "# **Title** \n\n- a \n\n- b\n\n|**H1**|**H2**|\n|---|---|\n|x|y|\n\n\n\nText **bold** stays."
    assert clean_markdown(raw) == "# Title\n\n- a\n- b\n\n| H1 | H2 |\n|---|---|\n| x | y |\n\nText **bold** stays.\n"


def test_rotated_and_one_line_pages_are_labelled(tmp_path):
    """pymupdf4llm returned nothing for pages shown rotated (/Rotate 90/180/270), and dropped a page whose
    only text sits where a running header would; both have a text layer, so both get their text."""
    import pymupdf

    (tmp_path / "pdfs").mkdir()
    for rotation in (0, 90, 180, 270):
        doc = pymupdf.open()
        page = doc.new_page()
        page.insert_text((72, 100), f"Heading of the page turned {rotation}")
        page.insert_text((72, 300), "Body text that a reader sees sideways.")
        page.set_rotation(rotation)
        doc.save(tmp_path / "pdfs" / f"turned{rotation}.pdf")
    doc = pymupdf.open()
    doc.new_page().insert_text((72, 100), "A single line near the top of the page.")
    doc.save(tmp_path / "pdfs" / "one_line.pdf")
    render_pages(tmp_path / "pdfs", tmp_path / "pages", dpi=30, progress=False)
    out = {x.doc: x for x in label_pages(get_teacher(Params()), tmp_path / "pages", tmp_path / "pdfs",
                                         tmp_path / "labels", progress=False)}
    for rotation in (0, 90, 180, 270):
        x = out[f"turned{rotation}"]
        assert x.status == "labeled", (rotation, x.reason)
        assert f"Heading of the page turned {rotation}" in x.text and "Body text that a reader" in x.text
    assert out["one_line"].status == "labeled" and "A single line near the top" in out["one_line"].text


def test_unreadable_glyphs_are_not_labels():
    from ocr_finetune.teachers.text_layer import unmapped

    assert [c for c in "\ufffd a\ue001b\x07 é 漢字 한글\n" if unmapped(c)] == ["\ufffd", "\ue001", "\x07"]
