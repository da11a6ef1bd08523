"""Stage evaluate: base vs fine-tuned on eval.jsonl (and on some of the pages trained on, apart); metrics and
report to metrics/, scores to the adapter's MLflow run."""

from pathlib import Path

from common import params

from ocr_finetune.evaluate import evaluate_adapter

p = params()
dataset = Path(p.data.dataset_dir)
result = evaluate_adapter(p, dataset / f"{p.evaluate.split}.jsonl", p.train.output_dir, metrics_dir="metrics",
                          seen_jsonl=dataset / "train.jsonl" if p.evaluate.split != "train" else None)
print(f"evaluate: {result['summary']}")
