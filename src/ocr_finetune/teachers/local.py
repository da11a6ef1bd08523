"""A local model as teacher: any model family of this project (base or with a LoRA adapter), batched, with
a no-repeat n-gram guard at decode, and the same answer cache and output guards as the API teacher."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Iterator

from ..models.base import load_image
from ..params import LocalTeacherParams, Params
from .base import PageInput, PageLabel
from .cache import LabelCache, cache_key
from .prompts import Prompt
from .quality import answer_label


class LocalTeacher:
    name = "local"

    def __init__(self, params: Params, config: LocalTeacherParams, prompt: Prompt, cache_dir: str | Path,
                 max_repeat_fraction: float = 0.5):
        self.params, self.config, self.max_repeat_fraction = params, config, max_repeat_fraction
        # DeepSeek-OCR prompts carry the image placeholder; the system prompt has no place in them.
        self.prompt = prompt.user if "<image>" in prompt.user else f"<image>\n{prompt.user}"
        self.cache = LabelCache(cache_dir)
        self._model = None

    @property
    def model(self):
        if self._model is None:  # loaded on the first page that is not cached
            from ..infer import LocalModel

            self._model = LocalModel(self.params, adapter_dir=self.config.adapter, device=self.config.device)
        return self._model

    def settings(self) -> dict:
        adapter = self.config.adapter
        weights = Path(adapter) / "adapter_model.safetensors" if adapter else None
        m = self.params.model
        return {"teacher": "local", "family": m.family, "base": m.base, "resolution": m.resolution,
                "adapter": hashlib.sha256(weights.read_bytes()).hexdigest() if weights and weights.is_file() else None,
                "prompt": self.prompt, "max_new_tokens": self.config.max_new_tokens,
                "no_repeat_ngram_size": self.config.no_repeat_ngram_size}

    def to_label(self, page: PageInput, entry: dict) -> PageLabel:
        return answer_label(page, entry, self.name, self.max_repeat_fraction)

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        settings = self.settings()
        todo = []
        for page in pages:
            try:
                key = cache_key(page.image, **settings)  # reads the file: a missing one fails its page here
            except OSError as e:
                yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=str(e), teacher=self.name)
                continue
            entry = self.cache.get(key)
            if entry is not None:
                yield self.to_label(page, entry)
            else:
                todo.append((page, key))
        size = self.config.batch_size
        for i in range(0, len(todo), size):
            chunk, images = [], []
            for page, key in todo[i:i + size]:
                try:
                    images.append(load_image(page.image))
                    chunk.append((page, key))
                except (OSError, ValueError) as e:  # a missing or broken image fails its page, not the run
                    yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=str(e), teacher=self.name)
            if not chunk:
                continue
            answers = self.model.generate(images, self.prompt, self.config.max_new_tokens,
                                          self.config.no_repeat_ngram_size)
            for (page, key), (text, finish) in zip(chunk, answers):
                entry = {"text": text, "finish_reason": finish}
                self.cache.put(key, entry)
                yield self.to_label(page, entry)
