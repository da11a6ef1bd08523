"""Write dvc_plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined.

`dvc plots show/diff` pages load these three scripts from a CDN and stay blank without network. DVC uses an
`--html-template` (here set in .dvc/config as plots.html_template) in place of its own page; a template
without the `{scripts}` placeholder drops the CDN tags, so the inlined copies are the only ones loaded.
The versions are the ones dvc-render pins; the tarballs come from the npm registry and are checked against
the registry's published SHA-512 integrity. Run once after changing versions; the output is committed.
"""

import base64
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # dvc_render/vega.py SCRIPTS
OUT = Path(__file__).resolve().parents[1] / "dvc_plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>ocr-finetune plots</title>
    <!-- {versions}: inlined so the page renders offline (scripts/build_plots_template.py) -->
    {inline}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str) -> str:
    meta = json.load(urllib.request.urlopen(f"https://registry.npmjs.org/{name}/{version}", timeout=60))
    blob = urllib.request.urlopen(meta["dist"]["tarball"], timeout=120).read()
    algo, digest = meta["dist"]["integrity"].split("-", 1)
    assert algo == "sha512" and base64.b64encode(hashlib.sha512(blob).digest()).decode() == digest, name
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return tar.extractfile(f"package/build/{name}.min.js").read().decode("utf-8")


def main():
    scripts = []
    for name, version in PACKAGES.items():
        code = fetch(name, version)
        assert "</script" not in code.lower(), name  # would end the inline block early
        scripts.append(f"<script>/* {name}@{version} */\n{code}\n</script>")
    versions = ", ".join(f"{n}@{v}" for n, v in PACKAGES.items())
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(PAGE.format(versions=versions, inline="\n".join(scripts)), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB): {versions}")


if __name__ == "__main__":
    main()
