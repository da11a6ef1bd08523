"""A local model as teacher: any model family of this project (base or with a LoRA adapter), batched, with
a no-repeat n-gram guard at decode, and the same answer cache and output guards as the API teacher."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

from ..params import LocalTeacherParams, Params
from .base import PageInput, PageLabel
from .cache import Answers, LabelCache, cache_key
from .prompts import Prompt
from .quality import answer_label


# in the cache key: answers decoded before special tokens were kept (tables without their tags) are not reused
DECODING = "special-tokens-kept"


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
        if self._model is None:  # loaded on the first page that is not cached, by runtime.engine
            from ..engines import transcriber

            self._model = transcriber(self.params, adapter_dir=self.config.adapter, device=self.config.device)
        return self._model

    @property
    def data_wait_fraction(self) -> float | None:
        return self._model.data_wait_fraction if self._model is not None else None

    def settings(self) -> dict:
        adapter = self.config.adapter
        weights = Path(adapter) / "adapter_model.safetensors" if adapter else None
        m = self.params.model
        return {"teacher": "local", "family": m.family, "base": m.base, "resolution": m.resolution,
                "adapter": hashlib.sha256(weights.read_bytes()).hexdigest() if weights and weights.is_file() else None,
                "prompt": self.prompt, "max_new_tokens": self.config.max_new_tokens,
                "no_repeat_ngram_size": self.config.no_repeat_ngram_size,
                "no_repeat_window": self.config.no_repeat_window, "decoding": DECODING}

    def to_label(self, page: PageInput, entry: dict) -> PageLabel:
        return answer_label(page, entry, self.name, self.max_repeat_fraction)

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        """Cached answers first (the cache keys are hashes of the images, read in threads), then the other pages
        through the model, read and preprocessed in worker processes while the GPU decodes; each answer is
        cached by the process that decoded it (a Ray actor too) before it reaches this one."""
        settings = self.settings()
        pages = list(pages)
        todo = []
        with ThreadPoolExecutor(8) as pool:  # hashing releases the GIL: the files are read in parallel
            for page, key in zip(pages, pool.map(lambda p: _key_or_error(p.image, settings), pages)):
                if isinstance(key, OSError):  # a missing or unreadable file fails its page here
                    yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=str(key), teacher=self.name)
                elif (entry := self.cache.get(key)) is not None:
                    yield self.to_label(page, entry)
                else:
                    todo.append((page, key))
        if not todo:
            return
        answers = self.model.stream([page.image for page, _ in todo], self.prompt, self.config.max_new_tokens,
                                    self.config.batch_size, self.config.no_repeat_ngram_size, progress=False,
                                    no_repeat_window=self.config.no_repeat_window,
                                    answers=Answers(self.cache, [key for _, key in todo]))
        for i, text, finish in answers:
            page, key = todo[i]
            if text is None:  # a broken image fails its page, not the run
                yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=finish, teacher=self.name)
                continue
            yield self.to_label(page, {"text": text, "finish_reason": finish})


def _key_or_error(image: Path, settings: dict):
    try:
        return cache_key(image, **settings)
    except OSError as e:
        return e
