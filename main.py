"""`python main.py ...` is the same as the `ocr-finetune` command."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "src"))

from ocr_finetune.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
