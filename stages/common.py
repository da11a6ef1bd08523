"""Shared start of every stage: import the package (with a clear hint if the venv is not active) and
validate params.yaml before any work."""

import sys

try:
    from ocr_finetune.params import ParamsError, load_params
except ImportError as e:  # pragma: no cover - only without the package installed
    sys.exit(f"cannot import ocr_finetune ({e}). Activate the project environment first: "
             f"`source .venv/bin/activate` (after `make install`), or run `uv run dvc repro`.")


def params():
    try:
        return load_params("params.yaml")
    except ParamsError as e:
        sys.exit(f"error: {e}")
