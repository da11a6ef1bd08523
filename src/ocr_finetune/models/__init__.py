"""Model families. Each is one module exposing the same functions (see deepseek_ocr2.py); add a family by
adding a module and its line in FAMILIES (its name, module and preset names)."""

from __future__ import annotations

import importlib
from types import ModuleType

# name -> (its module, its resolution presets). The preset names are listed here as well as in the module so
# that params can be checked without importing torch or transformers; a test keeps the two equal.
FAMILIES = {
    "deepseek-ocr2": ("ocr_finetune.models.deepseek_ocr2", ("nocrop", "gundam")),
    "deepseek-ocr": ("ocr_finetune.models.deepseek_ocr", ("tiny", "small", "base", "large", "gundam")),
}


def get_family(name: str) -> ModuleType:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (allowed values: {', '.join(FAMILIES)})")
    return importlib.import_module(FAMILIES[name][0])
