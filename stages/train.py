"""Stage train: LoRA fine-tune the base model on train.jsonl; adapter to train.output_dir, run to MLflow."""

import os
from pathlib import Path

from common import params

from ocr_finetune.distributed import process_rank, relaunch
from ocr_finetune.tracking import start_run
from ocr_finetune.train import final_loss, train

p = params()
relaunch(p.train, [__file__])  # num_gpus x nodes > 1: torchrun runs this script once per GPU
# `dvc exp run` names the experiment (DVC_EXP_NAME): the MLflow run carries that name, so the two are one run
experiment = os.environ.get("DVC_EXP_NAME")
with start_run(p.tracking, run_name=experiment or f"lora-{p.lora.mode}", params=p) as tracker:
    tracker.set_tags({"dvc_experiment": experiment})
    result = train(p, Path(p.data.dataset_dir) / "train.jsonl", tracker=tracker, metrics_dir="metrics")
if process_rank() == 0:
    print(f"train: {result.steps} steps, {result.trainable_params:,} trainable params, final loss "
          f"{final_loss(result.losses):.4f} (mean of the last tenth of the steps)")
