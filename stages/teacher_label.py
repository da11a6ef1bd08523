"""Stage teacher_label: label every rendered page with the configured teacher; report teacher quality."""

import json
import sys
from pathlib import Path

from common import params

from ocr_finetune.teachers import get_teacher, label_pages, teacher_quality

p = params()
try:
    teacher = get_teacher(p)
    labels = label_pages(teacher, p.data.pages_dir, p.data.pdf_dir, p.data.labels_dir)
except ValueError as e:  # no key, or a server that refuses every request: one line, and dvc records nothing
    sys.exit(f"error: {e}")
if labels and all(x.status == "failed" for x in labels):  # a stage that "succeeds" here would be cached
    sys.exit(f"error: every page failed to be labelled, e.g. {labels[0].doc} page {labels[0].page}: "
             f"{labels[0].reason}")
quality = teacher_quality(labels, p.data.truth_dir)
if getattr(teacher, "usage", None) is not None:  # API teacher: requests, retries, failures, tokens
    quality["requests"] = teacher.usage.summary()
Path("metrics").mkdir(exist_ok=True)
per_page = quality.pop("per_page")
Path("metrics/teacher.json").write_text(json.dumps(quality, indent=2) + "\n", encoding="utf-8")
Path("metrics/teacher_pages.json").write_text(json.dumps(per_page, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
print(f"teacher_label: {quality['labeled']} labeled, {quality['unlabeled']} unlabeled, {quality['failed']} failed, "
      f"{quality['degenerate']} degenerate; CER vs truth {quality['cer']}" +
      (f"; requests {quality['requests']}" if "requests" in quality else ""))
