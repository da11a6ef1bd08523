"""Where pages are transcribed: `runtime.engine` picks one. Each engine is one file with a transcriber class
of one shape, `LocalModel`'s: `stream(images, prompt, max_new_tokens, batch_size, no_repeat_ngram_size,
progress, no_repeat_window, desc, answers)` yields (index, text or None, finish reason or failure) as pages
finish, decoding the batches of `data.batch_plan`; and `map_pages(fn, items)` runs a function over items
(rendering PDF pages) where the engine runs its CPU work. Adding an engine is one file and one entry here."""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

ENGINES = {
    "local": "ocr_finetune.infer:LocalModel",
    "ray": "ocr_finetune.engines.ray_data:RayTranscriber",
}


# what each engine needs beyond the base install, for the error when it is missing
EXTRAS = {"ray": ("ray", "pip install 'ocr-finetune[ray]'")}


def _engine_class(name: str):
    module, cls = ENGINES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        package, install = EXTRAS.get(name, (None, None))
        if package is None or (e.name or "").split(".")[0] != package:
            raise
        raise ValueError(f"runtime.engine {name} needs {package}, which is not installed: {install}") from None


def transcriber(params, adapter_dir=None, device: str = "auto"):
    """The model of `params` (with an adapter) behind the engine `params.runtime.engine` names."""
    return _engine_class(params.runtime.engine)(params, adapter_dir=adapter_dir, device=device)


def page_mapper(params) -> Callable[[Callable, list], Iterator] | None:
    """How `render_pages` spreads its pages: None in this process's own pool (the local engine), else the
    engine's `map_pages(fn, items)`, which yields (index, fn(item)) as they finish."""
    if params.runtime.engine == "local":
        return None
    return _engine_class(params.runtime.engine).mapper(params.runtime)


__all__ = ["ENGINES", "transcriber", "page_mapper"]
