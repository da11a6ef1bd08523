"""Stage pdf2img: every PDF in data.pdf_dir -> page images + manifest.json in data.pages_dir."""

import shutil

from common import params

from ocr_finetune.engines import page_mapper
from ocr_finetune.pdf import render_pages

p = params()
shutil.rmtree(p.data.pages_dir, ignore_errors=True)
c = p.pdf2img
manifest = render_pages(p.data.pdf_dir, p.data.pages_dir, dpi=c.dpi, fmt=c.format, start_page=c.start_page,
                        end_page=c.end_page, workers=c.workers, max_pixels=c.max_pixels,
                        map_pages=page_mapper(p))  # runtime.engine ray: on the cluster
print(f"pdf2img: {len(manifest.pages)} pages, {len(manifest.skipped)} PDFs skipped")
