"""Labels + page images -> JSONL conversations, split by document.

A record, in the seed's format (image paths relative to the JSONL file):
    {"messages": [{"role": "<|User|>", "content": "<image>\\n<prompt>", "images": ["../pages/a_p1.png"]},
                  {"role": "<|Assistant|>", "content": "<markdown>"}],
     "meta": {"doc": "a", "page": 1}}

An image path stays within the JSONL file's folder or the folder above it (its sibling pages folder, as
build_dataset writes it): absolute paths and `..` beyond that are refused, so a dataset file cannot make
training read (and an adapter learn) a file elsewhere on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

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


IMAGE_PATH_RULE = ("image paths must be relative to the JSONL file and stay within its folder or the folder "
                   "above it, as build_dataset writes them (\"../pages/x.png\" beside dataset/train.jsonl); "
                   "absolute paths and `..` beyond that are refused")


def escapes(image: str) -> bool:
    """Whether an image path, as written in a record, leaves the JSONL file's folder and the one above it.
    Judged on the text (links inside the tree are the user's own and followed); backslashes count as
    separators, as a file written on Windows means them."""
    name = image.replace("\\", "/")
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):  # absolute, or a Windows drive
        return True
    parts = posixpath.normpath(name).split("/")  # `..` now only leads: "a/../../../x" is "../../x"
    return parts[:2] == ["..", ".."] or parts == [".."]


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
    if escapes(images[0]):
        bad(f"image path {images[0]!r} leaves the dataset's folders: {IMAGE_PATH_RULE}")
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


class ReplacedTogether:
    """Text files written under temporary names beside their targets and moved into place only once every one
    of them is complete: a build stopped midway (a bad row, Ctrl-C, a full disk) leaves the previous files as
    they were and no temporary ones, never some new, some old and some cut short."""

    def __init__(self, *paths: Path):
        self.paths = [Path(p) for p in paths]
        self.tmps = [p.with_name(f".{p.name}.{os.getpid()}.tmp") for p in self.paths]
        self.files: list[TextIO] = []

    def __enter__(self) -> list[TextIO]:
        for path in self.paths:  # left by a run that was killed
            for stale in path.parent.glob(f".{path.name}.*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            for tmp in self.tmps:
                self.files.append(tmp.open("w", encoding="utf-8"))
        except BaseException:
            self._discard()
            raise
        return self.files

    def __exit__(self, kind, value, tb) -> None:
        try:
            for f in self.files:
                f.close()  # a full disk may only tell here
        except BaseException:
            self._discard()
            raise
        if kind is not None:
            self._discard()
            return
        for tmp, path in zip(self.tmps, self.paths):
            os.replace(tmp, path)

    def _discard(self) -> None:
        for f in self.files:
            try:
                f.close()
            except OSError:
                pass
        for tmp in self.tmps:
            tmp.unlink(missing_ok=True)


# why a page is not in the dataset, most urgent first: failed pages can be asked for again
DROPPED_ORDER = ("failed", "degenerate", "empty", "unlabeled")


def _dropped_as(status: str) -> str:
    return "empty" if status == "labeled" else status  # labeled, but with an empty label


def dropped_note(summary: dict) -> str | None:
    """One line: how many pages build_dataset left out, by why, with the first of each; None if none."""
    counts = summary.get("dropped") or {}
    if not counts:
        return None
    total = sum(counts.values())
    first = {}
    for x in summary["skipped_pages"]:
        first.setdefault(_dropped_as(x["status"]), x)
    kinds = sorted(counts, key=lambda k: DROPPED_ORDER.index(k) if k in DROPPED_ORDER else len(DROPPED_ORDER))
    parts = []
    for kind in kinds:
        x = first.get(kind)
        example = f" (the first: {x['doc']} page {x['page']}: {x['reason']})" if x else ""
        parts.append(f"{counts[kind]} {kind}{example}")
    note = f"{total} page{'s' if total != 1 else ''} not in the dataset: " + ", ".join(parts)
    if counts.get("failed"):
        note += "; failed pages are asked for again the next time teacher_label runs"
    return note


def build_dataset(labels: list[PageLabel], pages_dir: str | Path, out_dir: str | Path, prompt: str,
                  eval_fraction: float, seed: int) -> dict:
    """Write train.jsonl, eval.jsonl and summary.json from labeled pages, all three or none (the previous ones
    are kept when the build stops); return the summary (counts, documents per split, pages left out and why)."""
    pages_dir, out_dir = Path(pages_dir), Path(out_dir)
    check_labels_complete(labels, pages_dir)
    if escapes(Path(os.path.relpath(pages_dir / "x", out_dir)).as_posix()):
        raise DatasetError(f"data.pages_dir ({pages_dir}) is not within the folder above data.dataset_dir "
                           f"({out_dir}), so the dataset could not name its images: {IMAGE_PATH_RULE}. Give both "
                           "folders one parent (e.g. data/pages and data/dataset)")
    out_dir.mkdir(parents=True, exist_ok=True)
    usable = [x for x in labels if x.status == "labeled" and x.text and x.text.strip()]
    train_docs, eval_docs = split_documents([x.doc for x in usable], eval_fraction, seed)
    kept = {id(x) for x in usable}
    dropped = [x for x in labels if id(x) not in kept]
    counts: dict[str, int] = {}
    for x in dropped:
        counts[_dropped_as(x.status)] = counts.get(_dropped_as(x.status), 0) + 1
    summary = {"train": {"pages": 0, "docs": sorted(train_docs)}, "eval": {"pages": 0, "docs": sorted(eval_docs)},
               "dropped": dict(sorted(counts.items())),
               "skipped_pages": [{"doc": x.doc, "page": x.page, "status": x.status,
                                  "reason": x.reason if x.reason or x.status != "labeled" else "the label is empty"}
                                 for x in dropped]}
    with ReplacedTogether(out_dir / "train.jsonl", out_dir / "eval.jsonl", out_dir / "summary.json") as written:
        files = dict(zip(("train", "eval", "summary"), written))
        for x in sorted(usable, key=lambda x: (x.doc, x.page)):
            image = pages_dir / x.image
            if not image.is_file():
                raise DatasetError(f"label for {x.doc} page {x.page}: image not found: {image}")
            split = "eval" if x.doc in eval_docs else "train"
            rec = make_record(Path(os.path.relpath(image, out_dir)).as_posix(), prompt, x.text, x.doc, x.page)
            validate_record(rec, f"label for {x.doc} page {x.page} ({split}.jsonl:{summary[split]['pages'] + 1})")
            files[split].write(json.dumps(rec, ensure_ascii=False) + "\n")
            summary[split]["pages"] += 1
        files["summary"].write(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return summary
