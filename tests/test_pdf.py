import json
import shutil

import pymupdf
from PIL import Image

from conftest import ROOT
from ocr_finetune.pdf import RenderManifest, open_pdf, PdfError, render_pages

SAMPLES = ROOT / "data" / "samples" / "pdfs"


def bad_pdfs(folder):
    """The inputs users really send: empty, truncated, encrypted, not a PDF at all."""
    folder.mkdir(exist_ok=True)
    (folder / "empty.pdf").write_bytes(b"")
    data = (SAMPLES / "annual_report.pdf").read_bytes()
    (folder / "truncated.pdf").write_bytes(data[: len(data) // 2])
    (folder / "text.pdf").write_bytes(b"this is not a pdf\n" * 20)
    png = pymupdf.open(SAMPLES / "price_table.pdf")[0].get_pixmap(dpi=20).tobytes("png")
    (folder / "picture.pdf").write_bytes(png)
    doc = pymupdf.open(SAMPLES / "price_table.pdf")
    doc.save(folder / "locked.pdf", encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="pw", owner_pw="owner")


def test_renders_named_pages_with_manifest(tmp_path):
    m = render_pages(SAMPLES, tmp_path, dpi=50, progress=False)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert "annual_report_p1.png" in names and "annual_report_p3.png" in names
    assert len(names) == len(m.pages) == sum(len(pymupdf.open(p)) for p in SAMPLES.glob("*.pdf"))
    saved = RenderManifest.load(tmp_path / "manifest.json")
    assert saved.dpi == 50 and len(saved.pages) == len(m.pages)
    scan = [p for p in saved.pages if p.doc == "scanned_letter"][0]
    assert scan.has_text is False
    with Image.open(tmp_path / "annual_report_p1.png") as im:
        assert abs(im.width - round(595 * 50 / 72)) <= 1


def test_dpi_format_and_page_range(tmp_path):
    m = render_pages(SAMPLES / "annual_report.pdf", tmp_path, dpi=100, fmt="jpg", start_page=2, end_page=3,
                     progress=False)
    assert sorted(p.image for p in m.pages) == ["annual_report_p2.jpg", "annual_report_p3.jpg"]
    with Image.open(tmp_path / "annual_report_p2.jpg") as im:
        assert im.format == "JPEG" and abs(im.width - round(595 * 100 / 72)) <= 1


def test_parallel_render_matches_serial(tmp_path):
    a = render_pages(SAMPLES, tmp_path / "a", dpi=40, workers=1, progress=False)
    b = render_pages(SAMPLES, tmp_path / "b", dpi=40, workers=2, progress=False)
    assert [p.image for p in a.pages] == [p.image for p in b.pages]
    for p in a.pages:
        assert (tmp_path / "a" / p.image).read_bytes() == (tmp_path / "b" / p.image).read_bytes()


def test_bad_pdfs_are_skipped_by_name_and_the_rest_proceed(tmp_path):
    src = tmp_path / "in"
    bad_pdfs(src)
    shutil.copy(SAMPLES / "korean_memo.pdf", src)
    m = render_pages(src, tmp_path / "out", dpi=40, workers=2, progress=False)
    assert [p.image for p in m.pages] == ["korean_memo_p1.png"]
    reasons = {s["pdf"]: s["reason"] for s in m.skipped}
    assert set(reasons) == {"empty.pdf", "truncated.pdf", "text.pdf", "picture.pdf", "locked.pdf"}
    assert "encrypted" in reasons["locked.pdf"]
    assert "corrupt" in reasons["truncated.pdf"] or "truncated" in reasons["truncated.pdf"]
    assert "not a PDF" in reasons["picture.pdf"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {s["pdf"] for s in manifest["skipped"]} == set(reasons)


def test_open_pdf_missing_file(tmp_path):
    try:
        open_pdf(tmp_path / "nope.pdf")
    except PdfError as e:
        assert "not found" in str(e)
    else:
        raise AssertionError("no error for a missing file")
