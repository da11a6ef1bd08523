import pymupdf

from conftest import ROOT
from ocr_finetune.samples import DOCUMENTS, write_corpus

SAMPLES = ROOT / "data" / "samples"


def test_corpus_is_regenerated_byte_identical(tmp_path):
    write_corpus(tmp_path)
    for folder in ("pdfs", "truth"):
        shipped = sorted(p.name for p in (SAMPLES / folder).iterdir())
        assert shipped == sorted(p.name for p in (tmp_path / folder).iterdir())
        for name in shipped:
            assert (SAMPLES / folder / name).read_bytes() == (tmp_path / folder / name).read_bytes(), name


def test_corpus_covers_what_the_pipeline_must_handle():
    pdfs = sorted((SAMPLES / "pdfs").glob("*.pdf"))
    assert len(pdfs) >= 6
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 5_000_000
    truth = {p.stem: p.read_text(encoding="utf-8") for p in (SAMPLES / "truth").glob("*.md")}
    everything = "\n".join(truth.values())
    assert any("\uac00" <= c <= "\ud7a3" for c in everything)  # Korean
    assert "\n# " in "\n" + everything and "\n## " in everything and "\n- " in everything
    assert "|---|" in everything  # a table
    pages = {p.stem: len(pymupdf.open(p)) for p in pdfs}
    assert max(pages.values()) >= 3  # a multi-page document
    image_only = [n for n, s in DOCUMENTS.items() if s.get("image_only")]
    assert image_only
    for name in image_only:
        doc = pymupdf.open(SAMPLES / "pdfs" / f"{name}.pdf")
        assert all(not page.get_text().strip() for page in doc)  # no text layer at all
        assert doc[0].get_images()  # but a picture of the page
    assert any(s["blocks"] and any(b.kind == "columns" for b in s["blocks"]) for s in DOCUMENTS.values())
    for name, n in pages.items():  # every page has its truth
        assert all(f"{name}_p{i}" in truth for i in range(1, n + 1))
