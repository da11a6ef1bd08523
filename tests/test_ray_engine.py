"""runtime.engine ray: transcription on a local Ray cluster of 2 actors, with the tiny model on CPU.

The Ray engine must write what the local engine writes, byte for byte, and must never transcribe a finished
page twice: not when one of its actors is killed, not when the whole run is killed and started again.
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from ocr_finetune.cli import apply_overrides, main  # noqa: E402
from ocr_finetune.teachers.cache import read_log  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_pages(folder: Path, docs: dict[str, int], broken: str | None = None) -> None:
    """Page images `{doc}_p{N}.png`, each with its own text (so its own cache key); `broken` a 0-byte file."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for doc, n in docs.items():
        for page in range(1, n + 1):
            im = Image.new("RGB", (240, 320), "white")
            draw = ImageDraw.Draw(im)
            for line in range(6):
                draw.text((12, 16 + 40 * line), f"{doc} page {page} line {line}", fill="black")
            im.save(folder / f"{doc}_p{page}.png")
    if broken:
        (folder / broken).write_bytes(b"")


def params_file(tmp_path: Path, models_cache: Path, answers: str, **runtime) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["cache_dir"] = str(models_cache)
    raw["teacher"].update(kind="local", cache_dir=str(tmp_path / answers),
                          prompts_file=str(ROOT / "config" / "prompts.yaml"))
    raw["runtime"] = {"actors": 2, "gpus_per_actor": 0, "num_cpus": 4, **runtime}
    path = tmp_path / f"params_{answers}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def fresh_ray():
    yield
    ray.shutdown()  # the cluster this test started in-process: not left to the next test


def test_the_ray_engine_writes_what_the_local_engine_writes(tmp_path, models_cache, sample_dataset, fresh_ray):
    """Same pages, same params: the output files are byte-identical, in md and in json (status per page, the
    broken page failed alone with its reason), and the label cache the Ray actors filled answers a rerun on
    the local engine without decoding anything. PDF pages rendered and `evaluate`'s transcriptions on the
    cluster come out the same too."""
    write_pages(tmp_path / "pages", {"alpha": 4, "beta": 3, "gamma": 1}, broken="beta_p4.png")
    outputs = {}
    for engine in ("local", "ray"):
        params = params_file(tmp_path, models_cache, f"answers_{engine}")
        for fmt in ("md", "json"):
            out = tmp_path / f"out_{engine}_{fmt}"
            rc = main(["infer", "--params", str(params), "--images", str(tmp_path / "pages"), "-o", str(out),
                       "--max-new-tokens", "10", "--batch-size", "3", "--format", fmt, "--engine", engine])
            assert rc == 1  # the broken page is reported as failed
            outputs[engine, fmt] = {p.name: p.read_bytes() for p in sorted(out.glob(f"*.{fmt}"))}
    for fmt in ("md", "json"):
        assert sorted(outputs["ray", fmt]) == [f"{d}.{fmt}" for d in ("alpha", "beta", "gamma")]
        assert outputs["ray", fmt] == outputs["local", fmt]
    assert b"failed" in outputs["ray", "json"]["beta.json"] and b"beta_p4.png" in outputs["ray", "json"]["beta.json"]
    log = read_log(tmp_path / "answers_ray")
    assert len(log) == 8 and len({x["key"] for x in log}) == 8  # md decoded every page once; json reused them
    assert all(not x["worker"].endswith(f"-{os.getpid()}") for x in log)  # decoded in the actors, not here

    # PDF pages rendered in the cluster's tasks: the same manifest and the same image bytes
    from ocr_finetune.engines import page_mapper
    from ocr_finetune.params import load_params
    from ocr_finetune.pdf import render_pages

    samples = ROOT / "data" / "samples" / "pdfs"
    here = render_pages(samples, tmp_path / "render_local", dpi=30, progress=False, workers=2)
    there = render_pages(samples, tmp_path / "render_ray", dpi=30, progress=False,
                         map_pages=page_mapper(apply_overrides(load_params(params), ["runtime.engine=ray"])))
    assert there.pages == here.pages and there.skipped == here.skipped and len(here.pages) >= 8
    for page in here.pages:
        ray_png, local_png = (tmp_path / d / page.image for d in ("render_ray", "render_local"))
        assert ray_png.read_bytes() == local_png.read_bytes()

    # evaluate's transcriptions on the cluster: the same outputs, hence the same scores
    from ocr_finetune.evaluate import evaluate

    scores = {}
    for engine in ("local", "ray"):
        p = apply_overrides(load_params(params), [f"runtime.engine={engine}", "evaluate.max_new_tokens=8",
                                                  "evaluate.batch_size=3", "train.device=cpu"])
        result = evaluate(p, sample_dataset, None, progress=False)
        scores[engine] = [(x["doc"], x["page"], x["base"]["output"], x["base"]["cer"]) for x in result["pages"]]
    assert scores["ray"] == scores["local"] and len(scores["ray"]) >= 5


def _infer_command(params: Path, pages: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ocr_finetune.cli", "infer", "--params", str(params), "--images", str(pages),
            "-o", str(out), "--max-new-tokens", "48", "--batch-size", "2", "--engine", "ray"]


def _wait_for(condition, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_actor_and_a_killed_run_redo_no_finished_page(tmp_path, models_cache):
    """One actor process is killed mid-run (Ray restarts it and retries its batch), then the whole run is
    killed (driver, cluster and all); the same command started again finishes every page, and across both
    runs each page was transcribed exactly once (the actors' logs in the label cache say who did what)."""
    docs = {f"doc{i}": 3 for i in range(8)}
    write_pages(tmp_path / "pages", docs)
    n_pages = sum(docs.values())
    params = params_file(tmp_path, models_cache, "answers")
    answers = tmp_path / "answers"
    command = _infer_command(params, tmp_path / "pages", tmp_path / "out")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        first = _wait_for(lambda: read_log(answers), 240, "the first batch")
        victim = int(first[0]["worker"].rsplit("-", 1)[1])
        os.kill(victim, signal.SIGKILL)  # an actor: Ray Data restarts it
        _wait_for(lambda: len(read_log(answers)) >= len(first) + 4, 240, "batches after the actor was killed")
        assert run.poll() is None, "the run ended before it could be killed: give it more pages"
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the whole run: driver, raylet, workers
        run.wait()
    done_before = len(read_log(answers))
    assert 0 < done_before < n_pages
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    log = read_log(answers)
    assert len(log) == n_pages and set(Counter(x["key"] for x in log).values()) == {1}
    assert len({x["worker"] for x in log}) >= 3  # two actors, one restarted (or the second run's)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.md")) == sorted(f"{d}.md" for d in docs)

