"""The API teacher against a real HTTP server on 127.0.0.1: retries, failures recorded, nothing paid twice."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image, ImageDraw

from conftest import ROOT
from openai_server import ScriptedOpenAI, image_id

from ocr_finetune.params import ApiTeacherParams, ParamsError, validate_params
from ocr_finetune.teachers.api import ApiTeacher
from ocr_finetune.teachers.base import PageInput
from ocr_finetune.teachers.cache import cache_key
from ocr_finetune.teachers.prompts import Prompt, get_prompt

KEY = "sk-test-" + "z" * 20
PROMPT = Prompt(system="Transcribe.", user="<|grounding|>Convert the document to markdown.")


def make_pages(folder, docs: dict[str, int]) -> list[PageInput]:
    folder.mkdir(parents=True, exist_ok=True)
    pages = []
    for d, (doc, n) in enumerate(docs.items()):
        for page in range(1, n + 1):
            im = Image.new("RGB", (120, 160), "white")
            ImageDraw.Draw(im).text((10, 10 + 10 * page), f"{doc} {page}", fill=(d * 40 % 255, 0, 0))
            path = folder / f"{doc}_p{page}.png"
            im.save(path)
            pages.append(PageInput(doc, page, path))
    return pages


def config(server, **overrides) -> ApiTeacherParams:
    return ApiTeacherParams(**{"base_url": server.base_url, "model_name": "test-ocr", "api_key_env": "TEST_OCR_KEY",
                               "concurrent_requests": 4, "timeout": 1.0, "max_retries": 3, "backoff": 0.05,
                               "max_backoff": 2.0, **overrides})


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("TEST_OCR_KEY", KEY)


def test_faults_are_retried_recorded_and_never_paid_twice(tmp_path):
    pages = make_pages(tmp_path / "pages", {"doc": 10})
    scripts = ["ok", "ok", "500 500", "429", "slow", "drop", "badjson " * 4, "nochoices " * 4, "loop", "length"]
    by_page = {p.page: image_id(p.image) for p in pages}
    with ScriptedOpenAI({by_page[i + 1]: s.split() for i, s in enumerate(scripts)}, slow_seconds=2.0) as server:
        teacher = ApiTeacher(config(server), PROMPT, tmp_path / "cache")
        labels = {x.page: x for x in teacher.label(pages)}
        status = {n: labels[n].status for n in labels}
        assert [status[n] for n in range(1, 11)] == ["labeled"] * 6 + ["failed", "failed", "degenerate", "degenerate"]
        assert "BadReply" in labels[7].reason and "not JSON" in labels[7].reason
        assert "no choices" in labels[8].reason
        assert "loop" in labels[9].reason and "max_tokens" in labels[10].reason
        assert labels[1].text.startswith("# Page") and "<|ref|>" not in labels[1].text  # grounding tags gone
        times = server.times[by_page[4]]
        assert times[1] - times[0] >= 0.95  # Retry-After: 1 honoured
        usage = teacher.usage.summary()
        # retries: 2 (500s) + 1 (429) + 1 (timeout) + 1 (drop) + 3 + 3 (malformed, until given up)
        assert (usage["requests"], usage["retries"], usage["failed"]) == (21, 11, 2)
        assert usage["prompt_tokens"] == 100 * 8  # answered pages only
        assert server.auth == {f"Bearer {KEY}"}
        assert all(KEY not in (x.text or "") + (x.reason or "") for x in labels.values())

        # A rerun asks only for the pages that never got an answer.
        before = server.requests.copy()
        again = ApiTeacher(config(server), PROMPT, tmp_path / "cache")
        relabeled = {x.page: x for x in again.label(pages)}
        asked_again = [n for n in range(1, 11) if server.requests[by_page[n]] > before[by_page[n]]]
        assert asked_again == [7, 8]
        assert {n: relabeled[n].status for n in relabeled} == {**status, 7: "labeled", 8: "labeled"}  # server healed
        print(f"\nAPI teacher: {len(pages)} pages, {usage['retries']} retries, {usage['failed']} failed, "
              f"re-requested on rerun: {len(set(asked_again) - {7, 8})}")


def test_api_key_name_not_value_in_params():
    with pytest.raises(ParamsError, match="teacher.api.api_key_env"):
        validate_params({"teacher": {"kind": "api", "api": {"api_key_env": KEY}}})


def test_missing_key_variable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_OCR_KEY")
    with pytest.raises(ValueError, match="TEST_OCR_KEY is not set"):
        ApiTeacher(ApiTeacherParams(api_key_env="TEST_OCR_KEY"), PROMPT, tmp_path)


def test_prompts_file_lists_tasks_and_names_bad_keys(tmp_path):
    assert get_prompt(ROOT / "config" / "prompts.yaml", "document").user.startswith("<|grounding|>")
    with pytest.raises(ParamsError, match="allowed values: document, free_ocr, figure"):
        get_prompt(ROOT / "config" / "prompts.yaml", "nope")
    bad = tmp_path / "p.yaml"
    bad.write_text("prompts:\n  document:\n    sytem: hi\n")
    with pytest.raises(ParamsError, match="prompts.document.user.*|prompts.document.sytem"):
        get_prompt(bad, "document")


def api_config_file(tmp_path, server, **api):
    path = tmp_path / "teacher_api.yaml"
    raw = yaml.safe_load((ROOT / "config" / "examples" / "teacher_api.params.example.yaml").read_text())
    raw["teacher"].update(prompts_file=str(ROOT / "config" / "prompts.yaml"), cache_dir=str(tmp_path / "cache"))
    raw["teacher"]["api"].update(base_url=server.base_url, api_key_env="TEST_OCR_KEY", **api)
    path.write_text(yaml.safe_dump(raw))
    return path


def infer_cmd(cfg, images, out, *extra):
    return [sys.executable, str(ROOT / "main.py"), "infer", "--params", str(ROOT / "params.yaml"), "--config", str(cfg),
            "--images", str(images), "--output", str(out), *extra]


def test_killed_run_requests_no_finished_page_again(tmp_path):
    pages = make_pages(tmp_path / "pages", {"a": 6, "b": 6})
    with ScriptedOpenAI(delay=0.4) as server:
        cfg = api_config_file(tmp_path, server, concurrent_requests=2)
        proc = subprocess.Popen(infer_cmd(cfg, tmp_path / "pages", tmp_path / "out"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        teacher = ApiTeacher(ApiTeacherParams(**yaml.safe_load(cfg.read_text())["teacher"]["api"]), get_prompt(
            ROOT / "config" / "prompts.yaml", "document"), tmp_path / "cache")
        keys = {p.page + (0 if p.doc == "a" else 100): cache_key(p.image, **teacher.settings()) for p in pages}
        deadline = time.time() + 120
        while len(teacher.cache) < 4 and time.time() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        finished = {n for n, k in keys.items() if teacher.cache.get(k) is not None}
        assert 4 <= len(finished) < 12
        asked = server.requests.copy()

        r = subprocess.run(infer_cmd(cfg, tmp_path / "pages", tmp_path / "out"), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        again = [p for p in pages if server.requests[image_id(p.image)] > asked[image_id(p.image)]]
        again_ids = {p.page + (0 if p.doc == "a" else 100) for p in again}
        assert not again_ids & finished  # no finished page paid twice
        assert len(again_ids) == 12 - len(finished)
        assert sorted(x.name for x in (tmp_path / "out").glob("*.md")) == ["a.md", "b.md"]
        print(f"\nkill -9 after {len(finished)} of 12 pages; rerun requested {len(again_ids)}, "
              f"finished pages re-requested: {len(again_ids & finished)}")


def test_documents_are_written_as_soon_as_their_pages_are_done(tmp_path):
    pages = make_pages(tmp_path / "pages", {"fast": 2, "slow": 2})
    slow = {image_id(p.image): ["slow"] for p in pages if p.doc == "slow"}
    with ScriptedOpenAI(slow, slow_seconds=3.0) as server:
        cfg = api_config_file(tmp_path, server, concurrent_requests=4, timeout=10)
        proc = subprocess.Popen(infer_cmd(cfg, tmp_path / "pages", tmp_path / "out", "--format", "json"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not (tmp_path / "out" / "fast.json").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "out" / "fast.json").exists() and not (tmp_path / "out" / "slow.json").exists()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        assert (tmp_path / "out" / "slow.json").exists() and "requests:" in out
        import json

        doc = json.loads((tmp_path / "out" / "fast.json").read_text())
        assert [p["page"] for p in doc["pages"]] == [1, 2] and all(p["status"] == "labeled" for p in doc["pages"])


def test_jsonl_output_is_training_data(tmp_path):
    from ocr_finetune.dataset import read_jsonl

    make_pages(tmp_path / "pages", {"memo": 2})
    with ScriptedOpenAI() as server:
        cfg = api_config_file(tmp_path, server)
        r = subprocess.run(infer_cmd(cfg, tmp_path / "pages", tmp_path / "out", "--format", "jsonl"),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    examples = read_jsonl(tmp_path / "out" / "memo.jsonl")  # validated like any training file
    assert [e.page for e in examples] == [1, 2] and all(e.image.is_file() for e in examples)
    assert all(e.target.startswith("# Page") for e in examples)


def test_config_file_errors_name_the_key(tmp_path):
    from ocr_finetune.params import Params, load_config
    from ocr_finetune.seed_config import load_teacher_config

    bad = tmp_path / "teacher.yaml"
    bad.write_text("teacher:\n  kind: api\n  api:\n    timeout: -1\n    concurent_requests: 4\n")
    with pytest.raises(ParamsError) as e:
        load_config(bad, Params())
    assert "teacher.api.timeout" in str(e.value) and "unknown key `teacher.api.concurent_requests`" in str(e.value)
    for example in ("teacher_api", "teacher_local"):  # the shipped examples are valid, in both shapes
        load_config(ROOT / "config" / "examples" / f"{example}.params.example.yaml", Params())
        load_teacher_config(ROOT / "config" / "examples" / f"{example}.example.yaml", Params())


def test_answers_of_other_servers_become_labels_or_say_why_not(tmp_path):
    """Shapes real servers send: content as parts (Mistral), a refusal (OpenAI), <think> in the content
    (reasoning models without a reasoning parser), a preamble before the fence, a content filter cut."""
    pages = make_pages(tmp_path / "pages", {"doc": 6})
    scripts = {1: "parts", 2: "refusal", 3: "think", 4: "fence", 5: "filter", 6: "ok"}
    by_page = {p.page: image_id(p.image) for p in pages}
    with ScriptedOpenAI({by_page[n]: [a] for n, a in scripts.items()}) as server:
        labels = {x.page: x for x in ApiTeacher(config(server), PROMPT, tmp_path / "cache").label(pages)}
        clean = labels[6].text
        assert clean.startswith("# Page") and "<|ref|>" not in clean
        for n in (1, 3, 4):
            assert labels[n].status == "labeled" and labels[n].text.startswith("# Page"), (n, labels[n])
            assert "hmm" not in labels[n].text and "think" not in labels[n].text and "```" not in labels[n].text
        assert labels[2].status == "degenerate" and "refused: I can't help" in labels[2].reason
        assert server.requests[by_page[2]] == 1  # a refusal is an answer: not asked again
        assert labels[5].status == "degenerate" and "content filter" in labels[5].reason


def test_a_server_that_trickles_its_answer_is_cut_at_the_deadline_and_asked_again(tmp_path):
    """Each read came within the 1 s timeout, so a trickling reply held its page for as long as it liked
    (86 s seen with timeout 2): teacher.api.deadline bounds the whole request; it is then retried."""
    pages = make_pages(tmp_path / "pages", {"doc": 1})
    key = image_id(pages[0].image)
    with ScriptedOpenAI({key: ["trickle"]}) as server:
        start = time.monotonic()
        labels = list(ApiTeacher(config(server, deadline=1.5), PROMPT, tmp_path / "cache").label(pages))
        elapsed = time.monotonic() - start
    assert labels[0].status == "labeled" and server.requests[key] == 2
    assert elapsed < 5, elapsed


def test_identical_pages_share_one_request(tmp_path):
    """Blank pages and repeated covers have the same bytes: 12 of them went out 12 times, and threads writing
    the same cache entry at once crashed the run."""
    pages = make_pages(tmp_path / "pages", {"doc": 2})
    blank = tmp_path / "pages" / "blank.png"
    Image.new("RGB", (120, 160), "white").save(blank)
    pages += [PageInput("blanks", n, blank) for n in range(1, 13)]
    with ScriptedOpenAI(delay=0.05) as server:
        labels = list(ApiTeacher(config(server, concurrent_requests=8), PROMPT, tmp_path / "cache").label(pages))
    assert sorted((x.doc, x.page) for x in labels) == sorted((p.doc, p.page) for p in pages)
    assert all(x.status == "labeled" for x in labels)
    assert server.requests[image_id(blank)] == 1 and sum(server.requests.values()) == 3


def test_a_refused_key_stops_the_run_and_is_never_written(tmp_path, monkeypatch):
    """401 for every page: the run stops at once with the server's message, without the key (this gateway
    echoes it), instead of failing 40 pages one by one and exiting 0."""
    from ocr_finetune.teachers.api import TeacherSetupError

    pages = make_pages(tmp_path / "pages", {"doc": 40})
    with ScriptedOpenAI({image_id(p.image): ["401"] * 3 for p in pages}) as server:
        teacher = ApiTeacher(config(server, concurrent_requests=2), PROMPT, tmp_path / "cache")
        with pytest.raises(TeacherSetupError, match="API key was refused") as error:
            list(teacher.label(pages))
        assert KEY not in str(error.value) and "[API key]" in str(error.value)
        assert sum(server.requests.values()) <= 4  # those in flight, not all 40
    assert not len(teacher.cache)


def test_request_fields_follow_params(tmp_path):
    """max_completion_tokens for models that refuse max_tokens; no temperature for models that refuse one."""
    pages = make_pages(tmp_path / "pages", {"doc": 1})
    with ScriptedOpenAI() as server:
        cfg = config(server, max_tokens_param="max_completion_tokens", temperature=None, max_tokens=77)
        [label] = ApiTeacher(cfg, PROMPT, tmp_path / "cache").label(pages)
    assert label.status == "labeled"
    assert server.bodies[0]["max_completion_tokens"] == 77
    assert "max_tokens" not in server.bodies[0] and "temperature" not in server.bodies[0]


def test_a_key_in_place_of_its_variable_name_is_refused_whatever_its_prefix():
    for value in ("gsk_AbC123secretKEY456", "sk-proj-abc", "hf_abcdefgh", "OPENAI_API_KEY "):
        with pytest.raises(ParamsError, match="never the key itself"):
            validate_params({"teacher": {"kind": "api", "api": {"api_key_env": value}}})
    validate_params({"teacher": {"kind": "api", "api": {"api_key_env": "GROQ_API_KEY"}}})


def test_set_reaches_nested_keys():
    from ocr_finetune.cli import apply_overrides
    from ocr_finetune.params import Params

    p = apply_overrides(Params(), ["teacher.api.base_url=http://10.0.0.5:8000/v1", "teacher.api.temperature=null"])
    assert p.teacher.api.base_url == "http://10.0.0.5:8000/v1" and p.teacher.api.temperature is None
    with pytest.raises(ParamsError, match="teacher.api.nope"):
        apply_overrides(Params(), ["teacher.api.nope=1"])


def test_ctrl_c_stops_sending_pages(tmp_path):
    """Ctrl-C during a run: the pages not yet sent are cancelled. Before, the executor's shutdown waited for
    every queued page, so the run went on asking (and paying) for all of them."""
    pages = make_pages(tmp_path / "pages", {"doc": 20})
    with ScriptedOpenAI(delay=0.5) as server:
        cfg = api_config_file(tmp_path, server, concurrent_requests=2)
        proc = subprocess.Popen(infer_cmd(cfg, tmp_path / "pages", tmp_path / "out"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while sum(server.requests.values()) < 2 and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        time.sleep(1.0)
        assert sum(server.requests.values()) <= 6  # those in flight and a few answered meanwhile, not 20


def test_no_quota_stops_the_run_and_no_part_of_an_echoed_key_is_stored(tmp_path):
    """429 `insufficient_quota` is a 429 like any other to the client, so it was retried (6 requests a page)
    instead of stopping the run; and an error cut at 300 characters before redaction kept the key's start."""
    from ocr_finetune.teachers.api import TeacherSetupError

    pages = make_pages(tmp_path / "pages", {"doc": 4})
    with ScriptedOpenAI({image_id(p.image): ["quota"] * 10 for p in pages}) as server:
        with pytest.raises(TeacherSetupError, match="no quota left"):
            list(ApiTeacher(config(server, concurrent_requests=1), PROMPT, tmp_path / "cache").label(pages))
        assert sum(server.requests.values()) <= 2  # the one that answered, and one sent meanwhile; not 4 x 4
    with ScriptedOpenAI({image_id(pages[0].image): ["400long"]}) as server:
        labels = {x.page: x for x in ApiTeacher(config(server), PROMPT, tmp_path / "cache2").label(pages)}
    assert labels[1].status == "failed" and "xxxx" in labels[1].reason
    assert KEY[:8] not in labels[1].reason


def test_a_caption_before_a_final_code_block_is_page_text():
    from ocr_finetune.teachers.quality import clean_output

    page = "Listing 1: hello world in C:\n```\nint main() {}\n```"
    assert clean_output(page) == page
    assert clean_output("Here is the page:\n```markdown\n# Title\n\nText.\n```") == "# Title\n\nText."


def test_unreadable_images_fail_before_any_request(tmp_path):
    """A 0-byte and a truncated PNG went to the server (paid requests) and came back `labeled`: no server can
    read them. They fail with the reason, as in the local teacher, and nothing is sent for them, now or on a
    rerun."""
    pages = make_pages(tmp_path / "pages", {"doc": 1})
    noisy = tmp_path / "pages" / "noise.png"
    Image.effect_noise((200, 260), 60).convert("RGB").save(noisy)
    data = noisy.read_bytes()
    (tmp_path / "pages" / "doc_p2.png").write_bytes(b"")  # a render killed before it wrote anything
    (tmp_path / "pages" / "doc_p3.png").write_bytes(data[:len(data) // 2])  # a copy cut off midway
    pages += [PageInput("doc", n, tmp_path / "pages" / f"doc_p{n}.png") for n in (2, 3)]
    with ScriptedOpenAI() as server:
        for _ in range(2):  # the rerun asks nothing either
            teacher = ApiTeacher(config(server), PROMPT, tmp_path / "cache")
            labels = {x.page: x for x in teacher.label(pages)}
            assert labels[1].status == "labeled"
            for n in (2, 3):
                assert labels[n].status == "failed" and "not a readable image" in labels[n].reason, labels[n]
                assert f"doc_p{n}.png" in labels[n].reason
            assert "truncated" in labels[3].reason
            assert teacher.usage.failed == 2
        assert dict(server.requests) == {image_id(pages[0].image): 1}


def test_retry_after_as_an_http_date_is_honoured_within_max_backoff(tmp_path):
    """Retry-After may be a date (RFC 9110): it was read as no value, and the page asked again after the
    0.05 s backoff. A date an hour ahead waits teacher.api.max_backoff, not an hour."""
    pages = make_pages(tmp_path / "pages", {"doc": 2})
    soon, later = (image_id(p.image) for p in pages)
    with ScriptedOpenAI({soon: ["429date"], later: ["429later"]}) as server:
        labels = list(ApiTeacher(config(server, max_backoff=1.5), PROMPT, tmp_path / "cache").label(pages))
    assert [x.status for x in labels] == ["labeled", "labeled"]
    waited = {key: server.times[key][1] - server.times[key][0] for key in (soon, later)}
    assert 0.9 <= waited[soon] <= 3.5, waited  # the date is in whole seconds: 1-2 s ahead, at most 1.5 waited
    assert 1.4 <= waited[later] <= 3.5, waited  # bounded: not the hour asked for
