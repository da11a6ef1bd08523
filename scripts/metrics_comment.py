"""The body of the pull-request comment: metrics and params of this branch against the base branch.

    python scripts/metrics_comment.py --base origin/main > comment.md

It runs `dvc metrics diff --md` and `dvc params diff --md` (DVC's own tables: old value, new value, change)
and wraps them with a marker line, so the workflow (.github/workflows/metrics.yml) updates its one comment
instead of adding a new one on every push.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MARKER = "<!-- ocr-finetune-metrics -->"


def dvc(*args: str) -> str:
    r = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{r.stderr}")
    return r.stdout.strip()


def comment(base: str, head: str | None = None) -> str:
    revs = [base] + ([head] if head else [])
    metrics = dvc("metrics", "diff", "--md", "--precision", "4", *revs)
    params = dvc("params", "diff", "--md", *revs)
    lines = [MARKER, f"## Metrics: this branch vs `{base}`", "",
             metrics or "No metric changed.", "",
             "<details><summary>Params changed</summary>", "", params or "No param changed.", "", "</details>",
             "", "CER/NED: lower is better; TEDS: higher is better. Page-by-page: `metrics/report.html` "
             "(workflow artifact)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the base revision (e.g. origin/main)")
    ap.add_argument("--head", help="compare against this revision instead of the workspace")
    args = ap.parse_args(argv)
    sys.stdout.write(comment(args.base, args.head))
    return 0


if __name__ == "__main__":
    sys.exit(main())
