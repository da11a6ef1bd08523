"""PDF pages to images with PyMuPDF, in parallel, skipping (and recording) PDFs that cannot be read."""

from __future__ import annotations

import json
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

PAGE_IMAGE = re.compile(r"^(?P<doc>.+)_p(?P<page>\d+)\.(?P<ext>png|jpe?g)$", re.IGNORECASE)


class PdfError(Exception):
    """A PDF that cannot be rendered: missing, corrupt, encrypted, empty, or not a PDF."""


@dataclass
class PageImage:
    doc: str
    page: int  # 1-based page number in the PDF
    image: str  # file name, relative to the pages directory
    width: int
    height: int
    has_text: bool  # the page has a text layer


@dataclass
class RenderManifest:
    dpi: int
    format: str
    pages: list[PageImage] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"pdf": name, "reason": message}

    def save(self, path: Path):
        path.write_text(json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "RenderManifest":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(dpi=raw["dpi"], format=raw["format"], pages=[PageImage(**p) for p in raw["pages"]],
                   skipped=raw.get("skipped", []))


def page_image_name(doc: str, page: int, fmt: str = "png") -> str:
    return f"{doc}_p{page}.{fmt}"


def parse_page_image_name(name: str) -> tuple[str, int] | None:
    m = PAGE_IMAGE.match(Path(name).name)
    return (m["doc"], int(m["page"])) if m else None


def open_pdf(path: str | Path) -> "pymupdf.Document":  # noqa: F821
    """Open a PDF or raise PdfError saying why not.

    PyMuPDF opens some broken files without complaint (a truncated file is silently 'repaired' into empty
    pages, an image renamed .pdf opens as a one-page document), so the flags are checked, not only exceptions.
    """
    path = Path(path)
    if not path.is_file():
        raise PdfError(f"{path}: file not found")
    import pymupdf  # here, not at the top: inference on page images runs without PyMuPDF

    try:
        doc = pymupdf.open(path)
    except (pymupdf.FileDataError, pymupdf.EmptyFileError, RuntimeError, ValueError) as e:
        raise PdfError(f"{path.name}: not a readable PDF ({e})") from None
    if not doc.is_pdf:
        raise PdfError(f"{path.name}: not a PDF file")
    if doc.needs_pass:
        raise PdfError(f"{path.name}: encrypted (password protected); decrypt it first, e.g. `qpdf --decrypt`")
    if doc.page_count == 0:
        raise PdfError(f"{path.name}: the PDF has no pages")
    if doc.is_repaired:
        raise PdfError(f"{path.name}: corrupt or truncated PDF (PyMuPDF had to repair it)")
    return doc


def list_pdfs(source: str | Path) -> list[Path]:
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise PdfError(f"{source}: no such file or directory")
    return sorted(p for p in source.iterdir() if p.suffix.lower() == ".pdf")


def _render_one(task) -> tuple[str, int, int, bool]:
    pdf_path, index, out_path, dpi, fmt = task
    import pymupdf

    with pymupdf.open(pdf_path) as doc:
        page = doc[index]
        has_text = bool(page.get_text("text").strip())
        pix = page.get_pixmap(dpi=dpi, alpha=False)
        if fmt == "jpg":
            pix.save(out_path, output="jpeg", jpg_quality=92)
        else:
            pix.save(out_path)
        return out_path, pix.width, pix.height, has_text


def render_pages(source: str | Path, out_dir: str | Path, dpi: int = 200, fmt: str = "png",
                 start_page: int = 1, end_page: int | None = None, workers: int = 1,
                 progress: bool = True) -> RenderManifest:
    """Render pages [start_page, end_page] of every PDF under `source` to `{doc}_p{N}.{fmt}` in out_dir.

    Unreadable PDFs are reported, listed in the manifest's `skipped`, and do not stop the others.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = RenderManifest(dpi=dpi, format=fmt)
    tasks = []
    for pdf in list_pdfs(source):
        try:
            with open_pdf(pdf) as doc:
                count = doc.page_count
        except PdfError as e:
            manifest.skipped.append({"pdf": pdf.name, "reason": str(e)})
            tqdm.write(f"skipped {e}")
            continue
        last = count if end_page is None else min(end_page, count)
        for n in range(start_page, last + 1):
            tasks.append((str(pdf), n - 1, str(out_dir / page_image_name(pdf.stem, n, fmt)), dpi, fmt))
    bar = tqdm(total=len(tasks), desc="pdf2img", unit="page", disable=not progress)
    results = []
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_render_one, tasks, chunksize=4):
                results.append(r)
                bar.update()
    else:
        for t in tasks:
            results.append(_render_one(t))
            bar.update()
    bar.close()
    for (pdf, index, *_), (out_path, w, h, has_text) in zip(tasks, results):
        manifest.pages.append(PageImage(doc=Path(pdf).stem, page=index + 1, image=Path(out_path).name,
                                        width=w, height=h, has_text=has_text))
    manifest.save(out_dir / "manifest.json")
    return manifest
