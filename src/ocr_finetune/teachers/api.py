"""A teacher behind an OpenAI-compatible chat-completions API (vLLM, OpenAI, ...), through the `openai` client.

Pages go out `concurrent_requests` at a time. A failed request is retried with exponential backoff and jitter
(honouring `Retry-After`) on 429, 5xx, timeouts, dropped connections and malformed replies; a page that still
fails is recorded with its error and the run goes on. The retry loop is ours, not the client's
(`max_retries=0` there): the client does not retry a 200 reply that is not JSON or has no choices, and does
not say how many attempts a page took, which the run's summary reports. An image Pillow cannot decode (a
0-byte or truncated file) fails its page before anything is sent: no server reads it, and each request is paid.

`base_url` may list several endpoints (one model behind several servers): each has its own client and its own
workers (its `concurrent_requests`), all taking pages from one queue, so a faster server takes more. An
endpoint that keeps failing (`endpoint_failures` refused or dropped connections, or pages it answered with a
5xx, a timeout or a malformed reply, without an answer between) is taken out for `endpoint_cooldown` seconds,
and the page it was on goes back to the queue for the others, not counted as failed. A page fails when every
endpoint still up has failed it after its retries, or at once on an error of its own (a 400). The last
endpoint up is never taken out: it retries and fails pages as a single server does.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import queue
import threading
import time
from collections import deque
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


class EndpointDown(Exception):
    """The endpoint a page was on was taken out (its `error`, the page's last): the page goes to another."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class Closed(Exception):
    """The run stopped (Ctrl-C, a refused key) while a page waited for its next attempt."""


class TeacherSetupError(ValueError):
    """The server refuses every request (wrong key, no access, unknown model, no quota): asking for the other
    pages would only fail the same way, so the run stops with the server's message."""


# Statuses no retry and no other page will change; and the quota code OpenAI sends with 429
FATAL_STATUS = {401: "the API key was refused", 403: "the key has no access to this model or endpoint",
                404: "no such model or endpoint (check base_url, with its /v1, and model_name)"}
RETRIED_STATUS = {408, 409}  # request timeout, conflict: the openai client retries these too


def retried(error: Exception) -> bool:
    """Whether asking again may help: 429, 5xx, 408/409, timeouts, dropped connections, malformed replies."""
    if not isinstance(error, (openai.APIStatusError, openai.APIConnectionError, BadReply, PastDeadline)):
        return False
    status = getattr(error, "status_code", None)
    return status is None or status == 429 or status >= 500 or status in RETRIED_STATUS


def endpoint_fault(error: Exception, image: Path):
    """What an error counts against its endpoint, or None (a rate limit, the page's own 4xx): a refused or
    dropped connection counts each time; a 5xx, a timeout or a malformed reply may be the page's own doing (an
    image that crashes the server, a page too long to answer in time), so it counts once per page."""
    if isinstance(error, openai.APIConnectionError) and not isinstance(error, openai.APITimeoutError):
        return object()
    status = getattr(error, "status_code", None)
    if isinstance(error, (openai.APITimeoutError, BadReply, PastDeadline)) or (status or 0) >= 500:
        return image
    return None


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
    _endpoints: list = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def error(self, kind: str) -> None:
        with self._lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def summary(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        if len(self._endpoints) > 1:
            out["endpoints"] = {e.url: e.summary() for e in self._endpoints}
        return out


@dataclass(eq=False)
class Endpoint:
    """One server of teacher.api.base_url: its client, its workers, what it answered and its health."""

    url: str
    workers: int
    client: openai.OpenAI
    requests: int = 0
    answered: int = 0
    went_down: int = 0  # times it was taken out
    down_until: float = 0.0  # time.monotonic() it gets pages again
    faults: set = field(default_factory=set)  # since its last answer (see endpoint_fault)

    def up(self) -> bool:
        return time.monotonic() >= self.down_until

    def summary(self) -> dict:
        return {"requests": self.requests, "answered": self.answered, "went_down": self.went_down}


@dataclass(eq=False)
class Work:
    """One request's worth: a cache key, its image, and the endpoints that failed it after their retries."""

    key: str
    image: Path
    tried: set = field(default_factory=set)
    reason: str = ""  # its last error, should no endpoint be left for it
    checked: bool = False  # image decoded and cache looked up (once, whichever endpoint takes it)


class Dispatch:
    """The pages of one label() call, shared by every endpoint's workers, and the endpoints' health."""

    def __init__(self, endpoints: list[Endpoint], config: ApiTeacherParams, usage: Usage):
        self.endpoints, self.config, self.usage = endpoints, config, usage
        self.pending: deque[Work] = deque()
        self.results: queue.Queue = queue.Queue()  # (work, entry or reason) or (None, error)
        self.closed = threading.Event()
        self.cond = threading.Condition()

    def add(self, work: Work) -> None:
        with self.cond:
            self.pending.append(work)
            self.cond.notify_all()

    def take(self, endpoint: Endpoint) -> Work | None:
        """The next page this endpoint has not failed, once it is up; None when the run is over."""
        with self.cond:
            while not self.closed.is_set():
                wait = endpoint.down_until - time.monotonic()
                if wait <= 0:
                    for i, work in enumerate(self.pending):
                        if endpoint not in work.tried:
                            del self.pending[i]
                            return work
                    wait = None
                self.cond.wait(wait)
        return None

    def done(self, work: Work, outcome: dict | str) -> None:
        if isinstance(outcome, str):
            self.usage.add(failed=1)
        self.results.put((work, outcome))

    def elsewhere(self, work: Work) -> None:
        """Back to the queue for an endpoint that is up and has not failed it; failed if there is none."""
        with self.cond:
            if self._placeable(work):
                self.pending.append(work)
                self.cond.notify_all()
                return
        self.done(work, work.reason)

    def _placeable(self, work: Work) -> bool:
        return any(e.up() and e not in work.tried for e in self.endpoints)

    def failing(self, endpoint: Endpoint) -> bool:
        return len(endpoint.faults) >= self.config.endpoint_failures

    def fault(self, endpoint: Endpoint, token) -> None:
        """Taken out at endpoint_failures, if another endpoint is up and answering: one back from its
        cooldown that has not answered since does not count, lest the last good one go for it."""
        with self.cond:
            endpoint.faults.add(token)
            if (not self.failing(endpoint) or not endpoint.up()
                    or not any(e.up() and not self.failing(e) for e in self.endpoints if e is not endpoint)):
                return
            endpoint.down_until = time.monotonic() + self.config.endpoint_cooldown
            endpoint.went_down += 1
            stuck = [w for w in self.pending if not self._placeable(w)]  # only this endpoint had not failed them
            for work in stuck:
                self.pending.remove(work)
        for work in stuck:
            self.done(work, work.reason)

    def answered(self, endpoint: Endpoint) -> None:
        with self.cond:
            endpoint.answered += 1
            endpoint.faults.clear()
            if not endpoint.up():  # taken out while this answer was on its way: it is up after all
                endpoint.down_until = 0.0
                self.cond.notify_all()

    def abort(self, error: BaseException) -> None:
        self.close()
        self.results.put((None, error))

    def close(self) -> None:
        with self.cond:
            self.closed.set()
            self.cond.notify_all()


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
        self.config, self.prompt, self.max_repeat_fraction = config, prompt, max_repeat_fraction
        endpoints = config.endpoints()
        self._keys = {}  # variable name -> key
        for n, e in enumerate(endpoints, 1):
            if e["api_key_env"] not in self._keys:
                where = f"base_url item {n}: api_key_env" if e["api_key_env"] != config.api_key_env else "api_key_env"
                self._keys[e["api_key_env"]] = api_key(e["api_key_env"], where)
        self.endpoints = [Endpoint(e["url"], e["concurrent_requests"], openai.OpenAI(
            base_url=e["url"], api_key=self._keys[e["api_key_env"]], timeout=config.timeout, max_retries=0))
            for e in endpoints]
        self.cache = LabelCache(cache_dir)
        self.usage = Usage(_endpoints=self.endpoints)

    def settings(self) -> dict:
        """Everything besides the image that determines the answer (the cache key). With one endpoint, its URL
        too (as before lists, so caches stay valid); with several, none: they serve one model, and which of them
        answered does not change the answer."""
        return self.settings_at(self.endpoints[0].url if len(self.endpoints) == 1 else None)

    def settings_at(self, url: str | None) -> dict:
        c = self.config
        return {"teacher": "api", "model": c.model_name, **({"base_url": url.rstrip("/")} if url else {}),
                "system": self.prompt.system, "user": self.prompt.user, "max_tokens": c.max_tokens,
                "temperature": c.temperature}

    def cached(self, key: str, image: Path) -> dict | None:
        """The answer under this run's key, or else under the key of a run with the other shape (one endpoint:
        a run with several; several: a run with one of them alone), so a run resumed with more or fewer
        endpoints reuses what it has; such an answer is copied under this run's key."""
        entry = self.cache.get(key)
        if entry is not None and isinstance(entry.get("text"), str):
            return entry
        for url in [None] if len(self.endpoints) == 1 else [e.url for e in self.endpoints]:
            entry = self.cache.get(cache_key(image, **self.settings_at(url)))
            if entry is not None and isinstance(entry.get("text"), str):
                self.cache.put(key, entry)
                return entry
        return None

    def messages(self, image: Path) -> list[dict]:
        user = [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": self.prompt.user}]
        system = [{"role": "system", "content": self.prompt.system}] if self.prompt.system else []
        return system + [{"role": "user", "content": user}]

    def request(self, image: Path, endpoint: Endpoint) -> dict:
        """One attempt; returns {text, finish_reason, usage} or raises."""
        c = self.config
        # servers differ: newer OpenAI models take only max_completion_tokens, some refuse a temperature
        options = {c.max_tokens_param: c.max_tokens}
        if c.temperature is not None:
            options["temperature"] = c.temperature
        try:
            messages = self.messages(image)
            reply = within(c.deadline, lambda: endpoint.client.chat.completions.create(
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

    def ask(self, image: Path, endpoint: Endpoint, dispatch: Dispatch) -> dict:
        """request() with retries on one endpoint; raises the last error when they are used up, EndpointDown
        when the endpoint is taken out meanwhile."""
        c = self.config
        for attempt in range(c.max_retries + 1):
            self.usage.add(requests=1, retries=1 if attempt else 0)
            with dispatch.cond:
                endpoint.requests += 1
            try:
                return self.request(image, endpoint)
            except (openai.APIStatusError, openai.APIConnectionError, BadReply, PastDeadline) as e:  # timeouts are connection errors
                self.usage.error(type(e).__name__)
                status = getattr(e, "status_code", None)
                fatal = FATAL_STATUS.get(status)
                if fatal or getattr(e, "code", None) == "insufficient_quota":  # checked before 429's retries
                    at = f" at {endpoint.url}" if len(self.endpoints) > 1 else ""
                    raise TeacherSetupError(f"teacher.api: {fatal or 'the account has no quota left'}{at} "
                                            f"({self.redact(str(e))[:300]}); no page can be labelled, so the "
                                            "run stops here") from None
                if (token := endpoint_fault(e, image)) is not None:
                    dispatch.fault(endpoint, token)
                if not retried(e):  # other 4xx (bad request, too large): asking again will not help
                    raise
                if not endpoint.up():
                    raise EndpointDown(e) from None
                if attempt == c.max_retries:
                    raise
                wait = retry_after(e)
                if wait is None:
                    wait = min(c.max_backoff, c.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)
                if dispatch.closed.wait(min(wait, c.max_backoff)):
                    raise Closed() from None
                if not endpoint.up():
                    raise EndpointDown(e) from None
        raise AssertionError("unreachable")

    def redact(self, text: str) -> str:
        """The keys out of a message (some gateways echo them in their errors), before it is stored anywhere."""
        for key in self._keys.values():
            text = text.replace(key, "[API key]") if len(key) >= 8 else text
        return text

    def answer(self, work: Work, endpoint: Endpoint, dispatch: Dispatch) -> dict | str | None:
        """The cached or new answer for one image, or why there is none (the run goes on); None when the page
        went back to the queue for another endpoint."""
        if not work.checked:
            work.checked = True
            problem = unreadable(work.image)  # checked before the cache too: an answer to a broken file is no label
            if problem is not None:
                self.usage.error("UnreadableImage")
                return problem
            entry = self.cached(work.key, work.image)
            if entry is not None:
                self.usage.add(cached=1)
                return entry
        try:
            entry = self.ask(work.image, endpoint, dispatch)
        except (TeacherSetupError, Closed):
            raise
        except EndpointDown as e:  # not the page's fault: not counted against it
            work.reason = self.why(e.error)
            dispatch.elsewhere(work)
            return None
        except Exception as e:  # recorded, and the run goes on
            if not retried(e):
                return self.why(e)
            work.tried.add(endpoint)
            work.reason = self.why(e)
            dispatch.elsewhere(work)
            return None
        self.cache.put(work.key, entry)
        dispatch.answered(endpoint)
        self.usage.add(prompt_tokens=entry["prompt_tokens"], completion_tokens=entry["completion_tokens"])
        return entry

    def why(self, error: Exception) -> str:
        return self.redact(f"{type(error).__name__}: {error}")[:300]  # redacted before cut: no part of a key kept

    def work(self, endpoint: Endpoint, dispatch: Dispatch) -> None:
        """One of an endpoint's workers: pages from the queue until there are none."""
        try:
            while (work := dispatch.take(endpoint)) is not None:
                outcome = self.answer(work, endpoint, dispatch)
                if outcome is not None:
                    dispatch.done(work, outcome)
        except Closed:
            pass
        except BaseException as e:  # noqa: BLE001 - a refused key, or a bug: the run stops rather than waits
            dispatch.abort(e)

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
        dispatch = Dispatch(self.endpoints, self.config, self.usage)
        for key, same in by_key.items():
            dispatch.add(Work(key, same[0].image))
        workers = [threading.Thread(target=self.work, args=(endpoint, dispatch), daemon=True)
                   for endpoint in self.endpoints for _ in range(min(endpoint.workers, len(by_key)))]
        for worker in workers:
            worker.start()
        try:
            for _ in range(len(by_key)):
                work, outcome = dispatch.results.get()
                if work is None:
                    raise outcome
                for page in by_key[work.key]:
                    if isinstance(outcome, str):
                        yield PageLabel(page.doc, page.page, page.image.name, "failed", reason=outcome,
                                        teacher=self.name)
                    else:
                        yield self.to_label(page, outcome)
        finally:
            dispatch.close()
            for worker in workers:
                worker.join()


def api_key(variable: str, where: str) -> str:
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"teacher.api.{where}: the environment variable {variable} is "
                         f"{'empty' if key is not None else 'not set'} (a local vLLM without --api-key accepts "
                         f"any value, e.g. `export {variable}=EMPTY`)")
    return key


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
