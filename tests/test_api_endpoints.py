"""The API teacher over several endpoints (teacher.api.base_url as a list), against real servers on 127.0.0.1."""

import socket
import time
from contextlib import contextmanager

import pytest
from openai_server import ScriptedOpenAI, image_id
from test_api_teacher import KEY, PROMPT, make_pages

from ocr_finetune.params import ApiTeacherParams, ParamsError, validate_params
from ocr_finetune.teachers.api import ApiTeacher


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEST_OCR_KEY", KEY)


def config(base_url, **overrides) -> ApiTeacherParams:
    return ApiTeacherParams(**{"base_url": base_url, "model_name": "test-ocr", "api_key_env": "TEST_OCR_KEY",
                               "concurrent_requests": 2, "timeout": 5.0, "max_retries": 3, "backoff": 0.05,
                               "max_backoff": 0.5, "endpoint_cooldown": 0.5, **overrides})


@contextmanager
def nothing_listening():
    """The URL of a port that refuses connections: bound, so no one else takes it, but not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        sock.close()


def test_a_dead_and_a_killed_endpoint_leave_every_page_to_the_survivor_once(tmp_path):
    pages = make_pages(tmp_path / "pages", {doc: 10 for doc in "abcd"})
    ids = [image_id(p.image) for p in pages]
    assert len(set(ids)) == 40
    with (nothing_listening() as dead, ScriptedOpenAI(delay=0.1, stop_after=4) as killed,
          ScriptedOpenAI(delay=0.1) as survivor):
        teacher = ApiTeacher(config([dead, {"url": killed.base_url, "concurrent_requests": 3},
                                     {"url": survivor.base_url, "concurrent_requests": 3}]), PROMPT, tmp_path / "c")
        start = time.monotonic()
        labels = list(teacher.label(pages))
        elapsed = time.monotonic() - start
    assert sorted((x.doc, x.page) for x in labels) == sorted((p.doc, p.page) for p in pages)
    assert all(x.status == "labeled" for x in labels)
    assert all(killed.answered[i] + survivor.answered[i] == 1 for i in ids)  # each page answered once in all
    assert sum(killed.answered.values()) == 4 and len(teacher.cache) == 40
    assert all(survivor.requests[i] == survivor.answered[i] for i in ids)  # the survivor never asked twice
    cut_off = [i for i in ids if killed.requests[i] > killed.answered[i]]  # on their way when it died
    assert cut_off and all(survivor.answered[i] == 1 for i in cut_off)
    usage = teacher.usage.summary()
    assert usage["failed"] == 0
    by_url = usage["endpoints"]
    assert by_url[dead]["answered"] == 0 and by_url[dead]["requests"] >= 1 and by_url[dead]["went_down"] >= 1
    assert by_url[killed.base_url]["answered"] == 4 and by_url[killed.base_url]["went_down"] >= 1
    assert by_url[survivor.base_url] == {"requests": 36, "answered": 36, "went_down": 0}
    assert elapsed < 10, elapsed
    print(f"\n40 pages in {elapsed:.1f} s: {by_url}")


def test_a_page_fails_only_when_every_endpoint_failed_it(tmp_path):
    """A 400 is the page's own: failed at once, asked once. A page that gets 500s everywhere fails after each
    endpoint's retries without taking them out; one that gets 500s from one endpoint only is answered."""
    pages = make_pages(tmp_path / "pages", {"doc": 6})
    bad_request, broken, one_sided = (image_id(p.image) for p in pages[:3])
    scripts = {bad_request: ["400long"], broken: ["500"] * 10}
    with ScriptedOpenAI(scripts) as a, ScriptedOpenAI({**scripts, one_sided: ["500"] * 10}) as b:
        teacher = ApiTeacher(config([a.base_url, b.base_url], max_retries=1), PROMPT, tmp_path / "cache")
        labels = {x.page: x for x in teacher.label(pages)}
    assert [labels[n].status for n in range(1, 7)] == ["failed", "failed"] + ["labeled"] * 4
    assert a.requests[bad_request] + b.requests[bad_request] == 1
    assert a.requests[broken] == b.requests[broken] == 2 and "InternalServerError" in labels[2].reason
    assert a.answered[one_sided] == 1 and not b.answered[one_sided]
    usage = teacher.usage.summary()
    assert usage["failed"] == 2 and all(e["went_down"] == 0 for e in usage["endpoints"].values())


def test_answers_are_one_cache_whichever_endpoint_gave_them(tmp_path):
    """The same model behind several servers: a run resumed with other endpoints, with fewer or with more,
    asks for nothing already answered. The key of a single endpoint is what it was before lists."""
    pages = make_pages(tmp_path / "pages", {"doc": 4})
    more = make_pages(tmp_path / "more", {"extra": 3})
    with ScriptedOpenAI() as a, ScriptedOpenAI() as b, ScriptedOpenAI() as c:
        def run(base_url, what):
            labels = list(ApiTeacher(config(base_url), PROMPT, tmp_path / "cache").label(what))
            assert all(x.status == "labeled" for x in labels)

        run([a.base_url, b.base_url], pages)
        asked = sum(a.requests.values()) + sum(b.requests.values())
        run([c.base_url, {"url": b.base_url + "/"}], pages)  # other endpoints, another order
        run(c.base_url, pages)  # one of them alone
        assert asked == 4 and sum(b.requests.values()) + sum(a.requests.values()) == 4 and not c.requests
        run(c.base_url, more)  # a run with one endpoint...
        run([a.base_url, c.base_url], more)  # ...resumed with several
        assert sum(c.requests.values()) == 3 and sum(a.requests.values()) + sum(b.requests.values()) == 4
    single = ApiTeacher(config("http://h:8000/v1/"), PROMPT, tmp_path)
    assert single.settings()["base_url"] == "http://h:8000/v1"
    assert ApiTeacher(config(["http://h:8000/v1/"]), PROMPT, tmp_path).settings() == single.settings()
    assert "base_url" not in ApiTeacher(config(["http://h/v1", "http://g/v1"]), PROMPT, tmp_path).settings()


def test_each_endpoint_takes_its_own_key_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("OTHER_OCR_KEY", "sk-other-" + "y" * 20)
    pages = make_pages(tmp_path / "pages", {"doc": 6})
    with ScriptedOpenAI() as a, ScriptedOpenAI() as b:
        teacher = ApiTeacher(config([a.base_url, {"url": b.base_url, "api_key_env": "OTHER_OCR_KEY"}]), PROMPT,
                             tmp_path / "cache")
        assert all(x.status == "labeled" for x in teacher.label(pages))
    assert a.auth <= {f"Bearer {KEY}"} and b.auth <= {"Bearer sk-other-" + "y" * 20}
    monkeypatch.delenv("OTHER_OCR_KEY")
    with pytest.raises(ValueError, match="base_url item 2: api_key_env: the environment variable OTHER_OCR_KEY"):
        ApiTeacher(config(["http://h/v1", {"url": "http://g/v1", "api_key_env": "OTHER_OCR_KEY"}]), PROMPT, tmp_path)


def test_base_url_lists_are_checked_item_by_item():
    def api(base_url):
        return validate_params({"teacher": {"kind": "api", "api": {"base_url": base_url,
                                                                    "concurrent_requests": 4}}}).teacher.api

    assert api("http://h:8000/v1").endpoints() == [
        {"url": "http://h:8000/v1", "concurrent_requests": 4, "api_key_env": "OPENAI_API_KEY"}]
    assert [(e["url"], e["concurrent_requests"]) for e in api(
        ["http://a/v1", {"url": "http://b/v1", "concurrent_requests": 16}]).endpoints()] == [
        ("http://a/v1", 4), ("http://b/v1", 16)]
    for bad, message in [([], "non-empty list"), (5, "give a URL"),
                         (["http://a/v1", "http://a/v1/"], "item 2 of the list repeats item 1's URL"),
                         (["http://a/v1", 5], "item 2 of the list: give a URL"),
                         ([{"concurrent_requests": 2}], "item 1 of the list: give a URL"),
                         ([{"url": "http://a/v1", "concurency": 2}], "unknown key `concurency`"),
                         ([{"url": "http://a/v1", "concurrent_requests": 0}], "from 1 to 256"),
                         ([{"url": "http://a/v1", "api_key_env": "sk-abc"}], "never the key itself"),
                         (["http://a/v1", "https://h/v1?api-key=abc123"], "carries credentials")]:
        with pytest.raises(ParamsError, match="teacher.api.base_url") as error:
            api(bad)
        assert message in str(error.value), (bad, str(error.value))
    with pytest.raises(ParamsError) as error:
        api(["http://a/v1", "https://h/v1?api-key=abc123"])
    assert "abc123" not in str(error.value)

    from ocr_finetune.cli import apply_overrides
    from ocr_finetune.params import Params

    p = apply_overrides(Params(), ["teacher.api.base_url=[http://a:8000/v1, http://b:8000/v1]"])
    assert [e["url"] for e in p.teacher.api.endpoints()] == ["http://a:8000/v1", "http://b:8000/v1"]
