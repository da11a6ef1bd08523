"""Files written whole or not at all."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file beside it, renamed over it. A reader (or a run killed
    mid-write) never sees half a file. The temporary name is short and hidden: the final name may already be
    near the file system's 255 bytes, and listings of the folder skip it."""
    path = Path(path)
    tmp = path.with_name(f".{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
