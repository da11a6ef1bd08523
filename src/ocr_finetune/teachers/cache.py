"""Every teacher answer on disk, so nothing is paid for twice and an interrupted run loses nothing.

Keyed by what determines the answer: the image's bytes, the prompt, the model and the generation settings.
Each entry is one small JSON file written atomically (temp file + rename): a run killed mid-write leaves
either the whole entry or none, never a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path


def cache_key(image: Path, **settings) -> str:
    h = hashlib.sha256(Path(image).read_bytes())
    h.update(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()


class LabelCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):  # unreadable: ask again rather than fail the run
            return None

    def put(self, key: str, entry: dict) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # threads write at once too
        tmp.write_text(json.dumps(entry, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json")) if self.folder.is_dir() else 0


@dataclass
class Answers:
    """Where a transcriber keeps each answer the moment it has it, in the process that decoded it (a Ray actor
    on another machine too): the cache entry under `keys[i]`, and a line in that process's log
    (`cache/log/{host}-{pid}.jsonl`: which worker read which page, and when). An answer is on storage before
    the driver hears of it, so a run killed between the two loses nothing; the log is how a test (or a user)
    sees that no page was transcribed twice."""

    cache: LabelCache
    keys: list[str]

    def put(self, key: str, text: str, finish: str) -> None:
        self.cache.put(key, {"text": text, "finish_reason": finish})
        log = self.cache.folder / "log" / f"{socket.gethostname()}-{os.getpid()}.jsonl"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "finish": finish, "time": round(time.time(), 3)}) + "\n")


def read_log(folder: str | Path) -> list[dict]:
    """Every line of every worker's log in a cache folder (Answers.put)."""
    rows = []
    for path in sorted((Path(folder) / "log").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append({**json.loads(line), "worker": path.stem})
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
    return rows
