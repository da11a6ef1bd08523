"""Stage build_dataset: labels + page images -> train.jsonl / eval.jsonl, split by document."""

from pathlib import Path

from common import params

from ocr_finetune.dataset import build_dataset, dropped_note
from ocr_finetune.teachers import read_labels

p = params()
labels = read_labels(Path(p.data.labels_dir) / "labels.jsonl")
summary = build_dataset(labels, p.data.pages_dir, p.data.dataset_dir, p.dataset.prompt, p.dataset.eval_fraction,
                        p.dataset.seed)
print(f"build_dataset: {summary['train']['pages']} train pages, {summary['eval']['pages']} eval pages")
if dropped_note(summary):  # counts by status also in summary.json ("dropped")
    print(f"note: {dropped_note(summary)}")
if summary["eval"]["pages"] == 0:
    print("note: no eval pages: documents are held out whole (dataset.eval_fraction), and with "
          f"{len(summary['train']['docs'])} document(s) none was; "
          "the evaluate stage needs at least one held-out document (add PDFs)")
