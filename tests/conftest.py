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
