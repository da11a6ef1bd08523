"""Labels + page images -> JSONL conversations, split by document.

A record, in the seed's format (image paths relative to the JSONL file):
    {"messages": [{"role": "<|User|>", "content": "<image>\\n<prompt>", "images": ["../pages/a_p1.png"]},
                  {"role": "<|Assistant|>", "content": "<markdown>"}],
     "meta": {"doc": "a", "page": 1}}
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .teachers.base import PageLabel

USER, ASSISTANT = "<|User|>", "<|Assistant|>"


class DatasetError(ValueError):
    """A dataset file or record is malformed; the message names the file and line."""


@dataclass
class Example:
    image: Path  # absolute or cwd-relative path to the page image
    prompt: str
    target: str
    doc: str
    page: int


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Deterministic split by document: a document's pages never span train and eval.

    Documents are ordered by a hash of (seed, name), so the split does not depend on file-system order, and
    the first ceil-ish share go to eval; with two or more documents both sides get at least one.
    """
    docs = sorted(set(docs))
    if eval_fraction <= 0 or len(docs) < 2:
        return set(docs), set()
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    n_eval = min(len(docs) - 1, max(1, round(eval_fraction * len(docs))))
    return set(ranked[n_eval:]), set(ranked[:n_eval])


def make_record(image_rel: str, prompt: str, target: str, doc: str, page: int) -> dict:
    return {"messages": [{"role": USER, "content": prompt, "images": [image_rel]},
                         {"role": ASSISTANT, "content": target}],
            "meta": {"doc": doc, "page": page}}


def validate_record(rec, where: str) -> None:
    def bad(msg):
        raise DatasetError(f"{where}: {msg}")

    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        bad('expected an object with a "messages" list')
    msgs = rec["messages"]
    if len(msgs) != 2 or not all(isinstance(m, dict) for m in msgs):
        bad("expected exactly two messages (user, assistant)")
    user, assistant = msgs
    if user.get("role") != USER or assistant.get("role") != ASSISTANT:
        bad(f'roles must be "{USER}" then "{ASSISTANT}", got {user.get("role")!r}, {assistant.get("role")!r}')
    if not isinstance(user.get("content"), str) or user["content"].count("<image>") != 1:
        bad("the user message must contain exactly one <image> placeholder")
    images = user.get("images")
    if not isinstance(images, list) or len(images) != 1 or not isinstance(images[0], str):
        bad('the user message needs "images": [one path]')
    if not isinstance(assistant.get("content"), str) or not assistant["content"].strip():
        bad("the assistant message (the label) is empty")
    meta = rec.get("meta")
    if meta is not None and not isinstance(meta, dict):
        bad('"meta" must be an object like {"doc": "report", "page": 3}')
    page = (meta or {}).get("page")
    if isinstance(page, str) and page.isdigit():  # "3": files written by other tools
        page = int(page)
    if page is not None and (isinstance(page, bool) or not isinstance(page, int) or page < 0):
        bad(f'"meta.page" must be a page number (an integer >= 0), got {page!r}')


def read_jsonl(path: str | Path, check_images: bool = True) -> list[Example]:
    """Read and validate a dataset file; every error names the line."""
    return [example for _, example in _records(Path(path), check_images)]


def _records(path: Path, check_images: bool) -> Iterator[tuple[int, Example]]:
    """(byte offset, example) of every record, validated. Read as bytes, so lines end at b"\n" only
    (str.splitlines() also cuts at U+2028, U+0085 and others, which JSON strings may hold)."""
    if not path.is_file():
        raise DatasetError(f"{path}: dataset file not found")
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            example = _parse(raw, path, n, check_images)
            if example is not None:
                yield start, example


def _parse(raw: bytes, path: Path, n: int, check_images: bool) -> Example | None:
    where = f"{path}:{n}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{where}: not UTF-8 text (byte {e.start + 1} of the line); save the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    validate_record(rec, where)
    user, assistant = rec["messages"]
    image = path.parent / user["images"][0]
    if check_images and not image.is_file():
        raise DatasetError(f"{where}: image not found: {image}")
    meta = rec.get("meta") or {}
    return Example(image=image, prompt=user["content"], target=assistant["content"],
                   doc=str(meta.get("doc", image.stem)), page=int(meta.get("page") or 0))


class JsonlPages:
    """A dataset file held as the byte offsets of its records, each read when asked for: 8 bytes a page in
    memory (plus its label's length, for train.group_by_length), not the labels themselves. Every record is
    validated when the file is opened, so a bad line stops the run before training starts."""

    def __init__(self, path: str | Path, check_images: bool = True):
        self.path = Path(path)
        self.offsets, self.target_chars = array("q"), array("q")
        for offset, example in _records(self.path, check_images):
            self.offsets.append(offset)
            self.target_chars.append(len(example.target))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, i: int) -> Example:
        with self.path.open("rb") as f:
            f.seek(self.offsets[i])
            return _parse(f.readline(), self.path, i + 1, check_images=False)

    def images(self) -> Iterator[Path]:
        """Every record's image, in one pass over the file (not one open and seek a record)."""
        for _, example in _records(self.path, check_images=False):
            yield example.image


def check_labels_complete(labels: list[PageLabel], pages_dir: Path) -> None:
    """Every rendered page has a label row (of any status): a labelling run that was stopped leaves a short
    labels.jsonl, and a dataset built from it would silently lose the rest of the pages."""
    from .pdf import RenderManifest

    if not (pages_dir / "manifest.json").is_file():
        return
    rendered = [(p.doc, p.page) for p in RenderManifest.load(pages_dir / "manifest.json").pages]
    have = {(x.doc, x.page) for x in labels}
    missing = [key for key in rendered if key not in have]
    if missing:
        doc, page = missing[0]
        raise DatasetError(f"the labels cover {len(rendered) - len(missing)} of {len(rendered)} rendered pages "
                           f"(the first missing: {doc} page {page}): the labelling run did not finish. Run "
                           "teacher_label again; the api and local teachers keep finished pages in their cache.")


def build_dataset(labels: list[PageLabel], pages_dir: str | Path, out_dir: str | Path, prompt: str,
                  eval_fraction: float, seed: int) -> dict:
    """Write train.jsonl and eval.jsonl from labeled pages; return a summary (counts, documents per split)."""
    pages_dir, out_dir = Path(pages_dir), Path(out_dir)
    check_labels_complete(labels, pages_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    usable = [x for x in labels if x.status == "labeled" and x.text and x.text.strip()]
    train_docs, eval_docs = split_documents([x.doc for x in usable], eval_fraction, seed)
    summary = {"train": {"pages": 0, "docs": sorted(train_docs)}, "eval": {"pages": 0, "docs": sorted(eval_docs)},
               "skipped_pages": [{"doc": x.doc, "page": x.page, "status": x.status, "reason": x.reason}
                                 for x in labels if x not in usable]}
    files = {"train": (out_dir / "train.jsonl").open("w", encoding="utf-8"),
             "eval": (out_dir / "eval.jsonl").open("w", encoding="utf-8")}
    try:
        for n, x in enumerate(sorted(usable, key=lambda x: (x.doc, x.page)), start=1):
            image = pages_dir / x.image
            if not image.is_file():
                raise DatasetError(f"label for {x.doc} page {x.page}: image not found: {image}")
            split = "eval" if x.doc in eval_docs else "train"
            rec = make_record(Path(os.path.relpath(image, out_dir)).as_posix(), prompt, x.text, x.doc, x.page)
            validate_record(rec, f"{split}.jsonl:{summary[split]['pages'] + 1}")
            files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
            summary[split]["pages"] += 1
    finally:
        for f in files.values():
            f.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return summary
