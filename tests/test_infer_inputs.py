"""Users' own pages into `infer`: image formats, orientation, transparency, folders, names, broken files."""

import subprocess
import sys

import numpy as np
import pymupdf
import pytest
from PIL import Image, ImageDraw

from conftest import ROOT
from test_cli import small_params

from ocr_finetune.infer import image_pages, infer_documents
from ocr_finetune.models.base import load_image
from ocr_finetune.pdf import render_pages
from ocr_finetune.teachers.base import PageLabel
from ocr_finetune.teachers.pdf_text import PdfTextTeacher


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_pages_are_read_upright_on_white(tmp_path, monkeypatch):
    """A PNG with a transparent background read as black (the text gone); a phone photo's EXIF orientation
    was ignored; a poster-sized image stopped the whole run (DecompressionBombError is no OSError)."""
    rgba = np.zeros((400, 300, 4), np.uint8)
    rgba[10:60, 10:150] = (0, 0, 0, 255)  # black text on nothing
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    Image.fromarray(rgba, "RGBA").convert("LA").save(tmp_path / "la.png")
    for name in ("t.png", "la.png"):
        page = np.asarray(load_image(tmp_path / name))
        assert page[200, 150].tolist() == [255, 255, 255] and page[30, 50].tolist() == [0, 0, 0], name

    upright = Image.new("RGB", (300, 400), "white")
    ImageDraw.Draw(upright).rectangle([0, 0, 299, 49], fill="black")  # a dark header band on top
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held sideways: "rotate 90 degrees clockwise to show"
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "photo.jpg", exif=exif.tobytes())
    page = load_image(tmp_path / "photo.jpg")
    assert page.size == (300, 400) and np.asarray(page.convert("L"))[:40].mean() < 30

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses images past twice this
    Image.new("RGB", (100, 100), "white").save(tmp_path / "poster.png")
    with pytest.raises(ValueError, match="too large"):
        load_image(tmp_path / "poster.png")


def test_image_folders_are_read_as_users_have_them(tmp_path):
    """Subfolders, every format Pillow reads, multi-page TIFFs as documents, hidden files skipped, pages in
    numeric order; files that are not images reported; two files for one page, or names that differ by case
    only, refused (one transcription would overwrite the other)."""
    src = tmp_path / "scans"
    (src / "sub").mkdir(parents=True)
    for name in ("a_p1.png", "a_p2.png", "a_p10.png", ".hidden_p1.png", "x.bmp", "sub/scan.webp"):
        Image.new("RGB", (60, 80), "white").save(src / name)
    frames = [Image.new("RGB", (60, 80), c) for c in ("white", "gray", "black")]
    frames[0].save(src / "scan3.tiff", save_all=True, append_images=frames[1:])
    (src / "notes.txt").write_text("not a page")
    pages, others = image_pages(src, tmp_path / "frames")
    assert [(p.doc, p.page) for p in pages] == [("a", 1), ("a", 2), ("a", 10), ("scan3", 1), ("scan3", 2),
                                                ("scan3", 3), ("sub__scan", 1), ("x", 1)]
    assert others == [src / "notes.txt"]
    tiff_pages = [p.image for p in pages if p.doc == "scan3"]
    assert [round(np.asarray(load_image(p).convert("L")).mean()) for p in tiff_pages] == [255, 128, 0]
    assert [(p.doc, p.page) for p in image_pages(src / "x.bmp", tmp_path / "frames")[0]] == [("x", 1)]

    Image.new("RGB", (60, 80)).save(src / "x.jpg")
    with pytest.raises(ValueError, match="x.bmp and .*x.jpg are both page 1"):
        image_pages(src, tmp_path / "frames")
    (src / "x.jpg").unlink()
    Image.new("RGB", (60, 80)).save(src / "A_p3.png")
    with pytest.raises(ValueError, match="differ only by case"):
        image_pages(src, tmp_path / "frames")


def test_infer_goes_on_past_unreadable_files_and_says_why(tmp_path, models_cache):
    """A broken link (or any file that cannot be read) fails its page, not the run: the other documents are
    written and the failed one says why. An --output that is a file is one line, not a traceback."""
    params = small_params(tmp_path, models_cache, teacher={"kind": "local"})  # infer follows teacher.kind
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (300, 400), "white").save(src / "good_p1.png")
    (src / "broken_p1.png").symlink_to(tmp_path / "nowhere.png")
    r = run("infer", "--params", params, "--images", src, "--output", tmp_path / "md", "--max-new-tokens", 4)
    assert r.returncode == 1 and "1 of 2 pages failed" in r.stdout, r.stderr[-2000:]
    assert (tmp_path / "md" / "good.md").is_file()
    broken = (tmp_path / "md" / "broken.md").read_text()
    assert "failed" in broken and "No such file" in broken
    (tmp_path / "file").write_text("x")
    r = run("infer", "--params", params, "--images", src, "--output", tmp_path / "file", "--max-new-tokens", 4)
    # the one error line (after the warning that the tiny model is random)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error:"), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = run("inspect", "--params", params, "-S", "model.base=./my-checkpoint")
    assert r.returncode == 2 and "no such checkpoint folder" in r.stderr and "download" not in r.stderr


def three_page_pdf(path):
    doc = pymupdf.open()
    for n in range(1, 4):
        doc.new_page().insert_text((72, 72), f"Page {n} of the report")
    doc.save(path)


def test_pages_that_were_not_rendered_stay_visible_and_stale_pages_go(tmp_path):
    three_page_pdf(tmp_path / "report.pdf")
    manifest = render_pages(tmp_path / "report.pdf", tmp_path / "pages", dpi=30, progress=False)
    assert len(list((tmp_path / "pages").glob("*.png"))) == 3
    (tmp_path / "pages" / "mine.png").write_bytes(b"the user's own file")
    render_pages(tmp_path / "report.pdf", tmp_path / "pages", dpi=30, end_page=1, progress=False)
    assert sorted(p.name for p in (tmp_path / "pages").glob("*.png")) == ["mine.png", "report_p1.png"]

    from ocr_finetune.teachers.base import PageInput

    pages = [PageInput(p.doc, p.page, tmp_path / "pages" / p.image, tmp_path / "report.pdf")
             for p in manifest.pages if p.page != 2]
    failed = [PageLabel("report", 2, "", "failed", reason="not rendered: a broken page")]
    render_pages(tmp_path / "report.pdf", tmp_path / "pages", dpi=30, progress=False)
    infer_documents(PdfTextTeacher(), pages, tmp_path / "md", failed=failed, progress=False)
    text = (tmp_path / "md" / "report.md").read_text()
    assert text.index("Page 1") < text.index("<!-- page 2: failed: not rendered: a broken page") < text.index("Page 3")


def test_a_name_too_long_for_its_output_fails_that_document_not_the_run(tmp_path, monkeypatch, capsys):
    """A 250-byte image name stopped the whole run (`File name too long` on the temporary .md). The .md now
    fits; the .jsonl (256 bytes) cannot exist: that document fails with the reason and the others are written."""
    from openai_server import ScriptedOpenAI
    from test_api_teacher import KEY, api_config_file

    from ocr_finetune.cli import main

    monkeypatch.setenv("TEST_OCR_KEY", KEY)
    long = "a" * 250
    (tmp_path / "in").mkdir()
    for name in (f"{long}.png", "good_p1.png"):
        Image.new("RGB", (120, 160), "white").save(tmp_path / "in" / name)
    with ScriptedOpenAI() as server:
        cfg = api_config_file(tmp_path, server, max_retries=0)
        args = ["infer", "--params", str(ROOT / "params.yaml"), "--config", str(cfg), "--images", str(tmp_path / "in")]
        assert main([*args, "--output", str(tmp_path / "md")]) == 0
        assert sorted(p.name for p in (tmp_path / "md").iterdir()) == sorted([f"{long}.md", "good.md"])
        capsys.readouterr()
        assert main([*args, "--output", str(tmp_path / "jsonl"), "--format", "jsonl"]) == 1
    out = capsys.readouterr().out
    assert [p.name for p in (tmp_path / "jsonl").iterdir()] == ["good.jsonl"]
    assert f"{long}: not written (File name too long)" in out and "1 of 2 pages failed" in out
