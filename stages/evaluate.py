"""Stage evaluate: base vs fine-tuned on eval.jsonl; metrics to metrics/ and to the adapter's MLflow run."""

from pathlib import Path

from common import params

from ocr_finetune.evaluate import evaluate
from ocr_finetune.tracking import start_run
from ocr_finetune.train import read_run_info

p = params()
run_id = read_run_info(p.train.output_dir).get("mlflow_run_id")
with start_run(p.tracking, run_id=run_id) as tracker:
    result = evaluate(p, Path(p.data.dataset_dir) / f"{p.evaluate.split}.jsonl", p.train.output_dir,
                      metrics_dir="metrics", tracker=tracker)
print(f"evaluate: {result['summary']}")
