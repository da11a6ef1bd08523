"""Model families. Each is one module exposing the same functions (see deepseek_ocr2.py); add a family by
adding a module and one line to FAMILIES."""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "deepseek-ocr2": "ocr_finetune.models.deepseek_ocr2",
    "deepseek-ocr": "ocr_finetune.models.deepseek_ocr",
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (allowed values: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name])
