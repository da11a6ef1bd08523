import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(ROOT / "stages"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """One tiny DeepSeek-OCR-2 checkpoint for the whole session (built offline, ~1 s)."""
    from ocr_finetune.models.deepseek_ocr2 import build_tiny

    return build_tiny(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def models_cache(tiny_dir):
    """A model.cache_dir that already holds the tiny checkpoint."""
    return tiny_dir.parent


@pytest.fixture(scope="session")
def tiny_v1_dir(models_cache):
    """A tiny DeepSeek-OCR (v1 architecture, native UnlimitedOcr class) beside it, saved under v1's names."""
    from ocr_finetune.models.deepseek_ocr import build_tiny

    return build_tiny(models_cache / "tiny-deepseek-ocr")


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory):
    """train.jsonl over every labeled page of the sample corpus, rendered small (30 dpi)."""
    from ocr_finetune.dataset import build_dataset
    from ocr_finetune.params import Params
    from ocr_finetune.pdf import render_pages
    from ocr_finetune.teachers import get_teacher, label_pages

    samples = ROOT / "data" / "samples" / "pdfs"
    tmp = tmp_path_factory.mktemp("samples_ds")
    render_pages(samples, tmp / "pages", dpi=30, progress=False)
    labels = label_pages(get_teacher(Params()), tmp / "pages", samples, tmp / "labels", progress=False)
    build_dataset(labels, tmp / "pages", tmp / "ds", "<image>\nFree OCR.", 0.0, 0)
    return tmp / "ds" / "train.jsonl"
