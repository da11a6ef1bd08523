import json
import os
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


def one_page_pdf(path, text, width=595, height=842, rotation=0):
    doc = pymupdf.open()
    page = doc.new_page(width=width, height=height)
    page.insert_text((72, 100), text)
    page.insert_text((72, 300), f"Second line of {text}.")
    page.set_rotation(rotation)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc.save(path)


def test_subfolders_upper_case_and_clashing_names_each_keep_their_own_pages(tmp_path):
    """Users' folders: the same file name in two subfolders, `.PDF`, two names that differ only in case. Each
    PDF gets its own document name and images, and its labels come from its own text layer."""
    from ocr_finetune.params import Params
    from ocr_finetune.teachers import get_teacher, label_pages

    src = tmp_path / "pdfs"
    texts = {"2024/report.pdf": "Revenue twenty four", "2025/report.pdf": "Revenue twenty five",
             "Scan.PDF": "Upper case extension", "notes.pdf": "Lower case notes", "Notes.PDF": "Capital notes",
             ".hidden/skip.pdf": "Never listed"}
    for rel, text in texts.items():
        one_page_pdf(src / rel, text)
    m = render_pages(src, tmp_path / "pages", dpi=30, workers=2, progress=False)
    docs = {p.pdf: p.doc for p in m.pages}
    assert set(docs) == set(texts) - {".hidden/skip.pdf"}
    assert docs["2024/report.pdf"] == "2024__report" and docs["Scan.PDF"] == "Scan"
    assert len({d.casefold() for d in docs.values()}) == len(docs)  # no two images share a name
    assert len(list((tmp_path / "pages").glob("*.png"))) == len(docs)
    labels = label_pages(get_teacher(Params()), tmp_path / "pages", src, tmp_path / "labels", progress=False)
    text_of = {x.doc: x.text for x in labels}
    for rel, doc in docs.items():
        assert texts[rel] in text_of[doc], (rel, text_of[doc])


def test_one_file_as_the_source_is_labelled_from_that_file(tmp_path):
    from ocr_finetune.params import Params
    from ocr_finetune.teachers import get_teacher, label_pages

    one_page_pdf(tmp_path / "in" / "Table.PDF", "Only this file")
    render_pages(tmp_path / "in" / "Table.PDF", tmp_path / "pages", dpi=30, progress=False)
    [label] = label_pages(get_teacher(Params()), tmp_path / "pages", tmp_path / "in" / "Table.PDF",
                          tmp_path / "labels", progress=False)
    assert label.status == "labeled" and "Only this file" in label.text


def test_a_page_too_large_for_the_dpi_is_rendered_smaller_not_lost(tmp_path):
    """MuPDF refuses a 14400 pt page (the largest a PDF allows) at 200 dpi; the run used to stop there and
    lose every page. It is rendered at the dpi that fits, the others at the asked one."""
    one_page_pdf(tmp_path / "pdfs" / "poster.pdf", "Poster", width=14400, height=14400)
    one_page_pdf(tmp_path / "pdfs" / "letter.pdf", "Letter")
    m = render_pages(tmp_path / "pdfs", tmp_path / "pages", dpi=200, workers=2, progress=False)
    pages = {p.doc: p for p in m.pages}
    assert set(pages) == {"poster", "letter"} and not m.skipped
    assert pages["letter"].dpi == 200 and pages["poster"].dpi < 200
    assert max(pages["poster"].width, pages["poster"].height) <= 12_000


def test_page_range_and_dpi_are_checked(tmp_path):
    import pytest

    one_page_pdf(tmp_path / "a.pdf", "Text")
    for kwargs in ({"start_page": 0}, {"start_page": -2}, {"dpi": 0}, {"dpi": -50}, {"start_page": 3, "end_page": 2}):
        with pytest.raises(ValueError):
            render_pages(tmp_path / "a.pdf", tmp_path / "pages", progress=False, **kwargs)
    m = render_pages(tmp_path / "a.pdf", tmp_path / "pages", start_page=5, progress=False)
    assert not m.pages and "has 1 pages, none from page 5" in m.skipped[0]["reason"]


def test_linked_folders_are_read_and_a_loop_ends(tmp_path):
    one_page_pdf(tmp_path / "archive" / "old.pdf", "Archived")
    one_page_pdf(tmp_path / "pdfs" / "new.pdf", "New")
    (tmp_path / "pdfs" / "archive").symlink_to(tmp_path / "archive", target_is_directory=True)
    (tmp_path / "archive" / "loop").symlink_to(tmp_path / "pdfs", target_is_directory=True)
    from ocr_finetune.pdf import list_pdfs

    found = [p.relative_to(tmp_path / "pdfs").as_posix() for p in list_pdfs(tmp_path / "pdfs")]
    assert found == ["archive/old.pdf", "new.pdf"]


def test_a_file_name_that_is_not_utf8_is_skipped_by_a_readable_name(tmp_path):
    """`café.pdf` saved by an old Windows zip tool (Latin-1 bytes): the manifest was left at 0 bytes and the run
    stopped with an error naming no file. It is skipped by a readable name, the others rendered."""
    src = tmp_path / "pdfs"
    one_page_pdf(src / "good.pdf", "Good")
    with open(os.path.join(os.fsencode(src), b"caf\xe9.pdf"), "wb") as f:
        f.write((src / "good.pdf").read_bytes())
    m = render_pages(src, tmp_path / "pages", dpi=30, progress=False)
    manifest = json.loads((tmp_path / "pages" / "manifest.json").read_text(encoding="utf-8"))
    assert [p["pdf"] for p in manifest["pages"]] == ["good.pdf"] == [p.pdf for p in m.pages]
    [skipped] = manifest["skipped"]
    assert skipped["pdf"] == "caf\\xe9.pdf" and "UTF-8" in skipped["reason"]


def test_the_manifest_is_replaced_atomically(tmp_path):
    """Written in place, a run killed mid-write (or a name that cannot be written) left a truncated manifest."""
    one_page_pdf(tmp_path / "a.pdf", "Text")
    render_pages(tmp_path / "a.pdf", tmp_path / "pages", dpi=30, progress=False)
    before = os.stat(tmp_path / "pages" / "manifest.json").st_ino
    render_pages(tmp_path / "a.pdf", tmp_path / "pages", dpi=30, progress=False)
    assert os.stat(tmp_path / "pages" / "manifest.json").st_ino != before  # a new file renamed over the old
    assert sorted(p.name for p in (tmp_path / "pages").iterdir()) == ["a_p1.png", "manifest.json"]


def test_a_huge_page_is_capped_in_pixels_at_a_lower_dpi_recorded_per_page(tmp_path):
    """A 5000 pt drawing rendered to 143 megapixels at 200 dpi (2.35 GB, 25 s, a decompression-bomb warning,
    then sent unscaled to an API): capped at `max_pixels`, its dpi lowered for that page alone."""
    from ocr_finetune.params import Params

    one_page_pdf(tmp_path / "pdfs" / "drawing.pdf", "Drawing", width=5000, height=3600)
    one_page_pdf(tmp_path / "pdfs" / "letter.pdf", "Letter")
    render_pages(tmp_path / "pdfs", tmp_path / "pages", dpi=100, max_pixels=1_000_000, progress=False)
    saved = json.loads((tmp_path / "pages" / "manifest.json").read_text())
    pages = {p["doc"]: p for p in saved["pages"]}
    assert saved["max_pixels"] == 1_000_000 and not saved["skipped"]
    assert pages["letter"]["dpi"] == 100 and pages["drawing"]["dpi"] < 100
    assert 0.8e6 < pages["drawing"]["width"] * pages["drawing"]["height"] <= 1_000_000
    with Image.open(tmp_path / "pages" / "drawing_p1.png") as im:
        assert im.width * im.height <= 1_000_000
    default = Params().pdf2img.max_pixels
    assert 4_000_000 <= default <= 40_000_000  # above what the models see, far below PIL's bomb limit
