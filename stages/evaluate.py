"""Stage evaluate: base vs fine-tuned on eval.jsonl; metrics and report to metrics/, scores to the adapter's
MLflow run."""

from pathlib import Path

from common import params

from ocr_finetune.evaluate import evaluate_adapter

p = params()
result = evaluate_adapter(p, Path(p.data.dataset_dir) / f"{p.evaluate.split}.jsonl", p.train.output_dir,
                          metrics_dir="metrics")
print(f"evaluate: {result['summary']}")
