"""A teacher behind an OpenAI-compatible chat-completions API (vLLM, OpenAI, ...), through the `openai` client.

Pages go out `concurrent_requests` at a time. A failed request is retried with exponential backoff and jitter
(honouring `Retry-After`) on 429, 5xx, timeouts, dropped connections and malformed replies; a page that still
fails is recorded with its error and the run goes on. The retry loop is ours, not the client's
(`max_retries=0` there): the client does not retry a 200 reply that is not JSON or has no choices, and does
not say how many attempts a page took, which the run's summary reports.
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import openai

from ..params import ApiTeacherParams
from .base import PageInput, PageLabel
from .cache import LabelCache, cache_key
from .prompts import Prompt
from .quality import answer_label


class BadReply(Exception):
    """A 200 reply that is not a usable chat completion."""


@dataclass
class Usage:
    """What a run asked for and got, summarised at the end."""

    requests: int = 0
    retries: int = 0
    cached: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: dict = field(default_factory=dict)  # error kind -> count
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


def image_data_url(path: Path) -> str:
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    if response is None:
        return None
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class ApiTeacher:
    name = "api"

    def __init__(self, config: ApiTeacherParams, prompt: Prompt, cache_dir: str | Path,
                 max_repeat_fraction: float = 0.5):
        key = os.environ.get(config.api_key_env)
        if key is None:
            raise ValueError(f"teacher.api.api_key_env: the environment variable {config.api_key_env} is not set "
                             f"(a local vLLM without --api-key accepts any value, e.g. `export "
                             f"{config.api_key_env}=EMPTY`)")
        self.config, self.prompt, self.max_repeat_fraction = config, prompt, max_repeat_fraction
        self.client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.timeout, max_retries=0)
        self.cache = LabelCache(cache_dir)
        self.usage = Usage()

    def settings(self) -> dict:
        """Everything besides the image that determines the answer (the cache key)."""
        c = self.config
        return {"teacher": "api", "model": c.model_name, "base_url": c.base_url, "system": self.prompt.system,
                "user": self.prompt.user, "max_tokens": c.max_tokens, "temperature": c.temperature}

    def messages(self, image: Path) -> list[dict]:
        user = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": self.prompt.user}]
        system = [{"role": "system", "content": self.prompt.system}] if self.prompt.system else []
        return system + [{"role": "user", "content": user}]

    def request(self, image: Path) -> dict:
        """One attempt; returns {text, finish_reason, usage} or raises."""
        try:
            reply = self.client.chat.completions.create(
                model=self.config.model_name, messages=self.messages(image), max_tokens=self.config.max_tokens,
                temperature=self.config.temperature)
        except json.JSONDecodeError as e:  # openai 3.x raises this raw for a 200 body that is not JSON
            raise BadReply(f"reply is not JSON ({e})") from None
        if not getattr(reply, "choices", None):
            raise BadReply("reply has no choices")
        choice = reply.choices[0]
        text = getattr(choice.message, "content", None) if choice.message else None
        if text is None:
            raise BadReply("reply has no message content")
        usage = reply.usage
        return {"text": text, "finish_reason": choice.finish_reason,
                "prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}

    def ask(self, image: Path) -> dict:
        """request() with retries; raises the last error when they are used up."""
        c = self.config
        for attempt in range(c.max_retries + 1):
            self.usage.add(requests=1, retries=1 if attempt else 0)
            try:
                return self.request(image)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, BadReply) as e:
                self.usage.error(type(e).__name__)
                if attempt == c.max_retries:
                    raise
                wait = retry_after(e)
                if wait is None:
                    wait = min(c.max_backoff, c.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                time.sleep(min(wait, c.max_backoff))
            except openai.APIStatusError as e:
                # Other 4xx (bad request, auth, too large): asking again will not help.
                self.usage.error(type(e).__name__)
                raise
        raise AssertionError("unreachable")

    def label_one(self, page: PageInput) -> PageLabel:
        key = cache_key(page.image, **self.settings())
        entry = self.cache.get(key)
        if entry is not None:
            self.usage.add(cached=1)
        else:
            try:
                entry = self.ask(page.image)
            except Exception as e:  # recorded, and the run goes on
                self.usage.add(failed=1)
                return PageLabel(page.doc, page.page, page.image.name, "failed",
                                 reason=f"{type(e).__name__}: {str(e)[:300]}", teacher=self.name)
            self.cache.put(key, entry)
            self.usage.add(prompt_tokens=entry["prompt_tokens"], completion_tokens=entry["completion_tokens"])
        return self.to_label(page, entry)

    def to_label(self, page: PageInput, entry: dict) -> PageLabel:
        return answer_label(page, entry, self.name, self.max_repeat_fraction)

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        with ThreadPoolExecutor(self.config.concurrent_requests) as pool:
            futures = [pool.submit(self.label_one, p) for p in pages]
            for future in as_completed(futures):
                yield future.result()
