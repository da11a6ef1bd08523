"""A teacher behind an OpenAI-compatible chat-completions API (vLLM, OpenAI, ...), through the `openai` client.

Pages go out `concurrent_requests` at a time. A failed request is retried with exponential backoff and jitter
(honouring `Retry-After`) on 429, 5xx, timeouts, dropped connections and malformed replies; a page that still
fails is recorded with its error and the run goes on. The retry loop is ours, not the client's
(`max_retries=0` there): the client does not retry a 200 reply that is not JSON or has no choices, and does
not say how many attempts a page took, which the run's summary reports. An image Pillow cannot decode (a
0-byte or truncated file) fails its page before anything is sent: no server reads it, and each request is paid.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Iterable, Iterator

import openai

from ..images import load_image
from ..params import ApiTeacherParams
from .base import PageInput, PageLabel
from .cache import LabelCache, cache_key
from .prompts import Prompt
from .quality import answer_label


class BadReply(Exception):
    """A 200 reply that is not a usable chat completion."""


class PastDeadline(Exception):
    """No complete answer within teacher.api.deadline (retried like a timeout)."""


def within(seconds: float | None, call):
    """call() if it returns within `seconds`, else PastDeadline. httpx's timeouts bound each read, not the
    whole answer, so a server that trickles a byte now and then holds a page forever; no client option sets
    a total, hence this. The call runs on in a daemon thread and its late answer is dropped."""
    if seconds is None:
        return call()
    box = {}

    def run():
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the caller as it is
            box["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise PastDeadline(f"no complete answer within teacher.api.deadline={seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class TeacherSetupError(ValueError):
    """The server refuses every request (wrong key, no access, unknown model, no quota): asking for the other
    pages would only fail the same way, so the run stops with the server's message."""


# Statuses no retry and no other page will change; and the quota code OpenAI sends with 429
FATAL_STATUS = {401: "the API key was refused", 403: "the key has no access to this model or endpoint",
                404: "no such model or endpoint (check base_url, with its /v1, and model_name)"}
RETRIED_STATUS = {408, 409}  # request timeout, conflict: the openai client retries these too


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


def unreadable(image: Path) -> str | None:
    """Why a page image cannot be decoded, or None: read as the local teacher reads it (images.load_image)."""
    try:
        load_image(image)
    except (FileNotFoundError, ValueError) as e:
        return str(e)
    return None


def retry_after(error: Exception) -> float | None:
    """The seconds a reply's Retry-After asks for, in either form RFC 9110 allows: seconds ("120") or an HTTP
    date ("Wed, 21 Oct 2026 07:28:00 GMT"); None without one or with one that is neither."""
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000" parses as naive; HTTP dates are GMT
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


class ApiTeacher:
    name = "api"

    def __init__(self, config: ApiTeacherParams, prompt: Prompt, cache_dir: str | Path,
                 max_repeat_fraction: float = 0.5):
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ValueError(f"teacher.api.api_key_env: the environment variable {config.api_key_env} is "
                             f"{'empty' if key is not None else 'not set'} (a local vLLM without --api-key accepts "
                             f"any value, e.g. `export {config.api_key_env}=EMPTY`)")
        self.config, self.prompt, self.max_repeat_fraction = config, prompt, max_repeat_fraction
        self._key = key
        self.client = openai.OpenAI(base_url=config.base_url, api_key=key, timeout=config.timeout, max_retries=0)
        self.cache = LabelCache(cache_dir)
        self.usage = Usage()

    def settings(self) -> dict:
        """Everything besides the image that determines the answer (the cache key)."""
        c = self.config
        return {"teacher": "api", "model": c.model_name, "base_url": c.base_url.rstrip("/"),
                "system": self.prompt.system, "user": self.prompt.user, "max_tokens": c.max_tokens,
                "temperature": c.temperature}

    def messages(self, image: Path) -> list[dict]:
        user = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": self.prompt.user}]
        system = [{"role": "system", "content": self.prompt.system}] if self.prompt.system else []
        return system + [{"role": "user", "content": user}]

    def request(self, image: Path) -> dict:
        """One attempt; returns {text, finish_reason, usage} or raises."""
        c = self.config
        # servers differ: newer OpenAI models take only max_completion_tokens, some refuse a temperature
        options = {c.max_tokens_param: c.max_tokens}
        if c.temperature is not None:
            options["temperature"] = c.temperature
        try:
            messages = self.messages(image)
            reply = within(c.deadline, lambda: self.client.chat.completions.create(
                model=c.model_name, messages=messages, **options))
        except json.JSONDecodeError as e:  # openai 3.x raises this raw for a 200 body that is not JSON
            raise BadReply(f"reply is not JSON ({e})") from None
        if not getattr(reply, "choices", None):
            error = getattr(reply, "error", None)  # some gateways answer 200 with {"error": ...}
            raise BadReply(f"reply has no choices{f' (error: {error})' if error else ''}")  # cut after redaction
        choice = reply.choices[0]
        message = choice.message
        usage = reply.usage
        counts = {"prompt_tokens": getattr(usage, "prompt_tokens", 0) or 0,
                  "completion_tokens": getattr(usage, "completion_tokens", 0) or 0}
        text = message_text(getattr(message, "content", None) if message else None)
        if text is None:
            refusal = getattr(message, "refusal", None) if message else None
            if refusal:  # the same page would be refused again: an answer, not an error
                return {"text": "", "finish_reason": "refusal", "refusal": str(refusal)[:300], **counts}
            if choice.finish_reason == "length":  # a reasoning model spent max_tokens before answering
                return {"text": "", "finish_reason": "length", **counts}
            raise BadReply("reply has no message content")
        return {"text": text, "finish_reason": choice.finish_reason, **counts}

    def ask(self, image: Path) -> dict:
        """request() with retries; raises the last error when they are used up."""
        c = self.config
        for attempt in range(c.max_retries + 1):
            self.usage.add(requests=1, retries=1 if attempt else 0)
            try:
                return self.request(image)
            except (openai.APIStatusError, openai.APIConnectionError, BadReply, PastDeadline) as e:  # timeouts are connection errors
                self.usage.error(type(e).__name__)
                status = getattr(e, "status_code", None)
                fatal = FATAL_STATUS.get(status)
                if fatal or getattr(e, "code", None) == "insufficient_quota":  # checked before 429's retries
                    raise TeacherSetupError(f"teacher.api: {fatal or 'the account has no quota left'} "
                                            f"({self.redact(str(e))[:300]}); no page can be labelled, so the "
                                            "run stops here") from None
                # other 4xx (bad request, too large): asking again will not help
                retried = status is None or status == 429 or status >= 500 or status in RETRIED_STATUS
                if not retried or attempt == c.max_retries:
                    raise
                wait = retry_after(e)
                if wait is None:
                    wait = min(c.max_backoff, c.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                time.sleep(min(wait, c.max_backoff))
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """The key out of a message (some gateways echo it in their errors), before it is stored anywhere."""
        return text.replace(self._key, "[API key]") if len(self._key) >= 8 else text

    def answer(self, key: str, image: Path) -> dict | str:
        """The cached or new answer for one image, or why there is none (the run goes on)."""
        problem = unreadable(image)  # checked before the cache too: an answer to a broken file is no label
        if problem is not None:
            self.usage.add(failed=1)
            self.usage.error("UnreadableImage")
            return problem
        entry = self.cache.get(key)
        if entry is not None and isinstance(entry.get("text"), str):
            self.usage.add(cached=1)
            return entry
        try:
            entry = self.ask(image)
        except TeacherSetupError:
            raise
        except Exception as e:  # recorded, and the run goes on
            self.usage.add(failed=1)
            return self.redact(f"{type(e).__name__}: {e}")[:300]  # redacted before cut: no part of a key kept
        self.cache.put(key, entry)
        self.usage.add(prompt_tokens=entry["prompt_tokens"], completion_tokens=entry["completion_tokens"])
        return entry

    def to_label(self, page: PageInput, entry: dict) -> PageLabel:
        return answer_label(page, entry, self.name, self.max_repeat_fraction)

    def label(self, pages: Iterable[PageInput]) -> Iterator[PageLabel]:
        """Labels in the order answers come. Pages with the same image bytes (blank pages, repeated covers)
        share one request. A server that refuses every request stops the run (TeacherSetupError), and so
        does Ctrl-C: pages not yet sent are cancelled, not sent."""
        by_key: dict[str, list[PageInput]] = {}
        settings = self.settings()
        for page in pages:
            try:
                by_key.setdefault(cache_key(page.image, **settings), []).append(page)
            except OSError as e:
                yield PageLabel(page.doc, page.page, page.image.name, "failed", teacher=self.name,
                                reason=f"image not readable: {e}")
        pool = ThreadPoolExecutor(self.config.concurrent_requests)
        try:
            futures = {pool.submit(self.answer, key, same[0].image): key for key, same in by_key.items()}
            for future in as_completed(futures):
                outcome = future.result()
                for page in by_key[futures[future]]:
                    if isinstance(outcome, str):
                        yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=outcome,
                                        teacher=self.name)
                    else:
                        yield self.to_label(page, outcome)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def message_text(content) -> str | None:
    """A message's text: a string, or (some servers, e.g. Mistral's reasoning models) a list of parts, of
    which the text parts count."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [part.get("text") if isinstance(part, dict) else getattr(part, "text", None) for part in content]
        kinds = [part.get("type") if isinstance(part, dict) else getattr(part, "type", None) for part in content]
        return "".join(t for t, kind in zip(parts, kinds) if isinstance(t, str) and kind in ("text", None))
    raise BadReply(f"message content of type {type(content).__name__}")
