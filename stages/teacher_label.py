"""Stage teacher_label: label every rendered page with the configured teacher; report teacher quality."""

import json
import sys
import tempfile
from pathlib import Path

from common import params

from ocr_finetune.regression_corpus import score_teacher
from ocr_finetune.teachers import failed_pages_error, get_teacher, label_pages, teacher_quality

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
if p.teacher.kind == "pdf_text":  # the text-layer teacher on the regression corpus: one page per failure class
    with tempfile.TemporaryDirectory() as tmp:
        quality["regression_corpus"] = score_teacher(teacher, tmp)
Path("metrics").mkdir(exist_ok=True)
per_page = quality.pop("per_page")
Path("metrics/teacher.json").write_text(json.dumps(quality, indent=2) + "\n", encoding="utf-8")
Path("metrics/teacher_pages.json").write_text(json.dumps(per_page, indent=2, ensure_ascii=False) + "\n",
                                              encoding="utf-8")
print(f"teacher_label: {quality['labeled']} labeled, {quality['unlabeled']} unlabeled, {quality['failed']} failed, "
      f"{quality['degenerate']} degenerate; CER vs truth {quality['cer']}" +
      (f"; requests {quality['requests']}" if "requests" in quality else ""))
problem = failed_pages_error(labels, p.teacher.allow_failed_pages)
if problem:  # after writing what succeeded; not recorded in dvc.lock, so the next `dvc repro` runs it again
    sys.exit(f"error: {problem}")
