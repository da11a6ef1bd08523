"""Shared start of every stage: import the package (with a clear hint if the venv is not active) and
validate params.yaml before any work."""

import os
import sys
import traceback

try:
    from ocr_finetune.cli import user_error
    from ocr_finetune.params import ParamsError, load_params
except ImportError as e:  # pragma: no cover - only without the package installed
    sys.exit(f"cannot import ocr_finetune ({e}). Activate the project environment first: "
             f"`source .venv/bin/activate` (after `make install`), or run `uv run dvc repro`.")


def _report(kind, value, tb):
    """A user's mistake (a param, a path, a file) or Ctrl-C as one line, as the CLI prints it; a bug keeps its
    traceback. The stage still exits non-zero, so `dvc repro` stops."""
    message = user_error(value, ": `dvc repro` goes on where it stopped (finished stages, checkpoints and "
                                "answered pages are kept)")
    if message is None or os.environ.get("OCR_FINETUNE_TRACEBACK"):
        sys.__excepthook__(kind, value, tb)
    else:  # where it was raised, in case a ValueError came from a bug rather than a mistake
        where = traceback.extract_tb(tb)[-1] if tb else None
        print(message + (f"\n  (raised at {where.filename}:{where.lineno}; OCR_FINETUNE_TRACEBACK=1 shows the "
                         "traceback)" if where and not isinstance(value, KeyboardInterrupt) else ""), file=sys.stderr)


sys.excepthook = _report


def params():
    try:
        return load_params("params.yaml")
    except ParamsError as e:
        sys.exit(f"error: {e}")
