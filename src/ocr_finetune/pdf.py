"""PDF pages to images with PyMuPDF, in parallel, skipping (and recording) PDFs that cannot be read."""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .files import write_text_atomic

PAGE_IMAGE = re.compile(r"^(?P<doc>.+)_p(?P<page>\d+)\.(?P<ext>png|jpe?g)$", re.IGNORECASE)


class PdfError(ValueError):
    """A PDF that cannot be rendered: missing, corrupt, encrypted, empty, or not a PDF."""


def readable(name: str) -> str:
    """A file name as text that can be printed and saved: bytes that are not UTF-8 (the surrogates os.listdir
    gives them) written as `\\xe9`."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class PageImage:
    doc: str
    page: int  # 1-based page number in the PDF
    image: str  # file name, relative to the pages directory
    width: int
    height: int
    has_text: bool  # the page has a text layer
    pdf: str = ""  # the source PDF, relative to the rendered folder (its name when one file was rendered)
    dpi: int = 0  # the resolution rendered at, below the manifest's for a page too large at that one


@dataclass
class RenderManifest:
    dpi: int
    format: str
    max_pixels: int = 0  # the cap on a page's pixels (pages past it: a lower dpi); 0 in older manifests
    pages: list[PageImage] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"pdf": name, "reason": message} (+ "page")

    def save(self, path: Path):
        write_text_atomic(path, json.dumps(asdict(self), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "RenderManifest":
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(dpi=raw["dpi"], format=raw["format"], pages=[PageImage(**p) for p in raw["pages"]],
                   skipped=raw.get("skipped", []), max_pixels=raw.get("max_pixels", 0))


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
        # not accepted as it is: a truncated file is 'repaired' into fewer or empty pages, silently
        raise PdfError(f"{path.name}: corrupt or truncated PDF (PyMuPDF had to repair it); if it opens in a "
                       "viewer, rewrite it with `qpdf in.pdf out.pdf` or `mutool clean in.pdf out.pdf` and retry")
    return doc


def list_pdfs(source: str | Path) -> list[Path]:
    """The PDFs under `source` (a file, or a folder searched with its subfolders; hidden ones skipped)."""
    source = Path(source)
    if not source.exists():
        raise PdfError(f"{source}: no such file or directory")
    return list_files(source, lambda name: name.lower().endswith(".pdf"))


def list_files(source: Path, wanted) -> list[Path]:
    """`source` itself if it is a file, else the files under it whose name `wanted` accepts, subfolders
    included, hidden files and folders skipped (macOS leaves `._report.pdf` beside each file it copies)."""
    if source.is_file():
        return [source]
    found, seen = [], set()
    # os.walk, not Path.rglob: rglob does not enter linked folders (before Python 3.13), and users link
    # archives into their folders rather than copy them; `seen` stops a link that loops
    for root, dirs, files in os.walk(source, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / f for f in files if not f.startswith(".") and wanted(f)]
    return sorted(found)


def document_names(paths: list[str]) -> dict[str, str]:
    """A document name per PDF path (relative to the rendered folder, `/`-separated), unique even where file
    systems ignore case: the path without the extension, folders joined by `__` (`2024/report.pdf` ->
    `2024__report`); a name taken already (by `report.pdf` and `Report.PDF`, say) gets `~2`, `~3`. Names
    become file names of page images, labels and transcriptions, so two PDFs must never share one."""
    names, taken = {}, set()
    for path in paths:
        base = "__".join(Path(path).with_suffix("").parts)
        name, n = base, 1
        while name.casefold() in taken:
            n += 1
            name = f"{base}~{n}"
        taken.add(name.casefold())
        names[path] = name
    return names


def source_pdf(pdf_dir: str | Path, page: PageImage) -> Path:
    """The PDF a rendered page came from (manifests written before `pdf` was recorded: `{doc}.pdf`)."""
    pdf_dir = Path(pdf_dir)
    if pdf_dir.is_file():
        return pdf_dir
    return pdf_dir / (page.pdf or f"{page.doc}.pdf")


# Pixels per rendered page at most (pdf2img.max_pixels): a page larger than this at the asked dpi (a poster,
# a CAD sheet: 5000 pt wide at 200 dpi was 143 megapixels, 2.35 GB and 25 s to render) is rendered at the dpi
# that fits. The models see at most ~4.7 megapixels of a page (DeepSeek-OCR gundam: a 1024 px view + 9 tiles of
# 640 px; OCR-2: 1024 + 6 of 768), so 20 leaves 4x to scale down from, and passes A4 at 300 dpi (8.7) and A3
# at 300 dpi (17.4) untouched; it is 60 MB as RGB, far below PIL's decompression-bomb warning (89).
MAX_PAGE_PIXELS = 20_000_000


def fitting_dpi(width_pt: float, height_pt: float, dpi: int, max_pixels: int) -> int:
    """`dpi`, or the highest dpi below it at which a page of this size has at most `max_pixels` pixels."""
    w, h = width_pt / 72, height_pt / 72
    if w * h <= 0:
        return dpi
    fit = min(dpi, max(1, int(math.sqrt(max_pixels / (w * h)))))
    while fit > 1 and math.ceil(w * fit) * math.ceil(h * fit) > max_pixels:  # MuPDF rounds the sides up
        fit -= 1
    return fit


def _render_one(task) -> tuple[str, int, int, bool, int, str | None]:
    """Render one page; errors come back as text (MuPDF's exceptions do not pickle across processes)."""
    pdf_path, index, out_path, dpi, fmt, max_pixels = task
    import pymupdf

    try:
        with pymupdf.open(pdf_path) as doc:
            page = doc[index]
            has_text = bool(page.get_text("text").strip())
            dpi = fitting_dpi(page.rect.width, page.rect.height, dpi, max_pixels)
            pix = page.get_pixmap(dpi=dpi, alpha=False)
            if fmt == "jpg":
                pix.save(out_path, output="jpeg", jpg_quality=92)
            else:
                pix.save(out_path)
            return out_path, pix.width, pix.height, has_text, dpi, None
    except Exception as e:  # one bad page must not cost the other pages of the run
        return out_path, 0, 0, False, dpi, f"{type(e).__name__}: {e}"


def _remove_previous_pages(out_dir: Path) -> None:
    """The page images an earlier run listed in its manifest: a run over fewer pages or PDFs would otherwise
    leave stale pages beside the new ones (and `infer --images` over the folder would read them). Files the
    manifest does not name are the user's and stay."""
    try:
        previous = RenderManifest.load(out_dir / "manifest.json")
    except (OSError, ValueError, TypeError, KeyError):
        return
    for page in previous.pages:
        if Path(page.image).name == page.image:  # a bare file name, never a path out of the folder
            (out_dir / page.image).unlink(missing_ok=True)


def render_pages(source: str | Path, out_dir: str | Path, dpi: int = 200, fmt: str = "png",
                 start_page: int = 1, end_page: int | None = None, workers: int = 1,
                 progress: bool = True, max_pixels: int = MAX_PAGE_PIXELS, map_pages=None) -> RenderManifest:
    """Render pages [start_page, end_page] of every PDF under `source` to `{doc}_p{N}.{fmt}` in out_dir
    (`document_names` gives `doc`), each page at most `max_pixels` (at a lower dpi where needed).

    Unreadable PDFs and pages are reported (once, here), listed in the manifest's `skipped`, and do not stop
    the others. `map_pages` (engines.page_mapper): render on a cluster instead of in `workers` processes here.
    """
    if not 10 <= dpi <= 1200:
        raise ValueError(f"dpi {dpi}: allowed values are 10 to 1200")
    if start_page < 1 or (end_page is not None and end_page < start_page):
        raise ValueError(f"pages {start_page}-{end_page if end_page is not None else 'end'}: the first page is 1 "
                         "and the last is not before the first")
    if fmt not in ("png", "jpg"):
        raise ValueError(f"format {fmt!r}: allowed values are png, jpg")
    if max_pixels < 1:
        raise ValueError(f"max_pixels {max_pixels}: must be at least 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_pages(out_dir)
    manifest = RenderManifest(dpi=dpi, format=fmt, max_pixels=max_pixels)
    pdfs = {(pdf.relative_to(source).as_posix() if Path(source).is_dir() else pdf.name): pdf
            for pdf in list_pdfs(source)}
    for rel in [rel for rel in pdfs if not _is_utf8(rel)]:
        # its name would become the names of page images, labels and lines of UTF-8 JSON, which cannot hold it
        del pdfs[rel]
        manifest.skipped.append({"pdf": readable(rel), "reason": f"{readable(rel)}: the file name is not UTF-8 "
                                 "(from another system's archive?); rename it, e.g. `convmv -f latin1 -t utf8`"})
        tqdm.write(f"skipped {manifest.skipped[-1]['reason']}")
    names = document_names(list(pdfs))
    tasks, docs = [], []
    for rel, pdf in pdfs.items():
        try:
            with open_pdf(pdf) as doc:
                count = doc.page_count
        except PdfError as e:
            manifest.skipped.append({"pdf": rel, "reason": str(e)})
            tqdm.write(f"skipped {e}")
            continue
        last = count if end_page is None else min(end_page, count)
        if start_page > last:
            manifest.skipped.append({"pdf": rel, "reason": f"{pdf.name}: has {count} pages, none from page "
                                                           f"{start_page}"})
            tqdm.write(f"skipped {manifest.skipped[-1]['reason']}")
        for n in range(start_page, last + 1):
            tasks.append((str(pdf), n - 1, str(out_dir / page_image_name(names[rel], n, fmt)), dpi, fmt, max_pixels))
            docs.append((names[rel], rel))
    bar = tqdm(total=len(tasks), desc="pdf2img", unit="page", disable=not progress)
    results = []
    if map_pages is not None:
        by_index = {}
        for i, r in map_pages(_render_one, tasks):
            by_index[i] = r
            bar.update()
        results = [by_index[i] for i in range(len(tasks))]
    elif workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_render_one, tasks, chunksize=4):
                results.append(r)
                bar.update()
    else:
        for t in tasks:
            results.append(_render_one(t))
            bar.update()
    bar.close()
    for (pdf, index, *_), (doc, rel), (out_path, w, h, has_text, page_dpi, error) in zip(tasks, docs, results):
        if error is not None:
            manifest.skipped.append({"pdf": rel, "doc": doc, "page": index + 1,
                                     "reason": f"{Path(pdf).name} page {index + 1}: cannot be rendered ({error})"})
            tqdm.write(f"skipped {manifest.skipped[-1]['reason']}")
            continue
        if page_dpi < dpi:
            tqdm.write(f"note: {Path(pdf).name} page {index + 1} is more than {max_pixels:,} pixels at {dpi} dpi "
                       f"(pdf2img.max_pixels); rendered at {page_dpi} dpi")
        manifest.pages.append(PageImage(doc=doc, page=index + 1, image=Path(out_path).name, width=w, height=h,
                                        has_text=has_text, pdf=rel, dpi=page_dpi))
    manifest.save(out_dir / "manifest.json")
    return manifest
