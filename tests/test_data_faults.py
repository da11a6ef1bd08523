"""Faults between the teacher and training: failed pages retried by the next `dvc repro`, dataset outputs
all or nothing, image paths kept inside the dataset's tree, undecodable files named by line."""

import json
import os
import runpy

import pytest
import yaml

from conftest import ROOT
from openai_server import ScriptedOpenAI, image_id
from test_api_teacher import make_pages
from test_dataset import PROMPT, labels_for

from ocr_finetune.dataset import DatasetError, JsonlPages, build_dataset, read_jsonl
from ocr_finetune.teachers import read_labels

KEY = "sk-test-" + "f" * 20


def rendered_pages(tmp_path):
    """Three pages as pdf2img leaves them: the images and their manifest."""
    pages = make_pages(tmp_path / "pages", {"doc": 3})
    manifest = {"dpi": 100, "format": "png", "pages": [
        {"doc": p.doc, "page": p.page, "image": p.image.name, "width": 120, "height": 160, "has_text": False}
        for p in pages]}
    (tmp_path / "pages" / "manifest.json").write_text(json.dumps(manifest))
    return pages


def write_params(tmp_path, server, allow_failed_pages=None):
    """params.yaml for the API teacher on `server`, paths relative to tmp_path (the stage's working folder)."""
    teacher = {"kind": "api", "prompts_file": str(ROOT / "config" / "prompts.yaml"), "cache_dir": "cache",
               "api": {"base_url": server.base_url, "api_key_env": "TEST_OCR_KEY", "max_retries": 0,
                       "concurrent_requests": 2, "timeout": 5.0}}
    if allow_failed_pages is not None:
        teacher["allow_failed_pages"] = allow_failed_pages
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"pdf_dir": "pdfs", "truth_dir": None, "pages_dir": "pages", "labels_dir": "labels",
                 "dataset_dir": "dataset"}, "teacher": teacher}))


def teacher_label_stage():
    """stages/teacher_label.py as `dvc repro` runs it, in this process: its exit message, or None."""
    try:
        runpy.run_path(str(ROOT / "stages" / "teacher_label.py"), run_name="__main__")
    except SystemExit as e:
        return e.code
    return None


def test_failed_pages_stop_the_stage_and_are_asked_again_by_the_next_run(tmp_path, monkeypatch):
    """A page that failed was recorded, the stage exited 0 and dvc.lock was written: the next `dvc repro` skipped
    the stage, the page was never asked again, and build_dataset dropped it without a word."""
    monkeypatch.setenv("TEST_OCR_KEY", KEY)
    monkeypatch.chdir(tmp_path)
    ids = [image_id(p.image) for p in rendered_pages(tmp_path)]
    with ScriptedOpenAI({ids[1]: ["500", "500"]}) as server:
        write_params(tmp_path, server)
        error = teacher_label_stage()
        assert error is not None and "1 of 3 pages failed" in str(error), error
        assert "doc page 2" in str(error) and "InternalServerError" in str(error)
        assert "teacher.allow_failed_pages" in str(error)
        # what succeeded is written: labels and metrics
        assert [x.status for x in sorted(read_labels("labels/labels.jsonl"), key=lambda x: x.page)] == \
            ["labeled", "failed", "labeled"]
        assert json.loads((tmp_path / "metrics" / "teacher.json").read_text())["failed"] == 1

        from ocr_finetune.dataset import dropped_note

        summary = build_dataset(read_labels("labels/labels.jsonl"), "pages", "dataset", PROMPT, 0.0, 0)
        assert summary["dropped"] == {"failed": 1}
        note = dropped_note(summary)
        assert "1 page not in the dataset: 1 failed (the first: doc page 2: InternalServerError" in note

        write_params(tmp_path, server, allow_failed_pages=True)  # failures accepted: the stage passes
        assert teacher_label_stage() is None
        assert json.loads((tmp_path / "metrics" / "teacher.json").read_text())["failed"] == 1

        write_params(tmp_path, server)  # the server healed: the rerun asks for that page only
        assert teacher_label_stage() is None
        assert [server.requests[i] for i in ids] == [1, 3, 1]
        assert {x.status for x in read_labels("labels/labels.jsonl")} == {"labeled"}
        assert json.loads((tmp_path / "metrics" / "teacher.json").read_text())["failed"] == 0


def test_dropped_pages_are_counted_by_status(tmp_path):
    labels = labels_for(tmp_path, docs=("a", "b"), pages=2)
    labels[1].status, labels[1].reason = "degenerate", "looping answer"
    labels[2].text = "  "
    summary = build_dataset(labels, tmp_path / "pages", tmp_path / "ds", PROMPT, 0.5, 0)
    assert summary["dropped"] == {"degenerate": 1, "empty": 1, "unlabeled": 1}
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["dropped"] == summary["dropped"]
    from ocr_finetune.dataset import dropped_note

    note = dropped_note(summary)
    assert note.startswith("3 pages not in the dataset: 1 degenerate (the first: a page 2: looping answer)")
    assert "1 unlabeled (the first: scan page 1: no text layer)" in note


def test_a_stopped_build_leaves_the_previous_dataset_whole(tmp_path):
    """A bad row stopped build_dataset after train.jsonl and eval.jsonl were opened for writing: both were left
    empty (or cut short) while summary.json kept the old counts."""
    labels = labels_for(tmp_path)
    build_dataset(labels, tmp_path / "pages", tmp_path / "ds", PROMPT, 0.34, 0)
    before = {f: (tmp_path / "ds" / f).read_bytes() for f in ("train.jsonl", "eval.jsonl", "summary.json")}
    assert all(before.values())
    (tmp_path / "pages" / "f_p2.png").unlink()  # the last page's image: every other row is written first
    with pytest.raises(DatasetError, match="image not found"):
        build_dataset(labels, tmp_path / "pages", tmp_path / "ds", PROMPT, 0.34, 0)
    assert {f: (tmp_path / "ds" / f).read_bytes() for f in before} == before
    assert sorted(os.listdir(tmp_path / "ds")) == sorted(before)  # no temporary files left behind


GOOD = ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": [%s]},'
        ' {"role": "<|Assistant|>", "content": "t"}]}')


@pytest.fixture
def dataset_tree(tmp_path):
    """data/dataset/d.jsonl beside data/pages/, as build_dataset lays them out; a PNG outside data/."""
    for f in ("data/pages/x.png", "data/dataset/y.png", "data/dataset/sub/z.png", "secret.png"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"png")
    return tmp_path


def test_image_paths_must_stay_in_the_dataset_tree(dataset_tree):
    """`../../etc/passwd` and absolute paths were opened, and a PNG anywhere on disk trained on. Paths relative to
    the JSONL file, within its folder or the one above (its sibling pages folder), are read as before."""
    path = dataset_tree / "data" / "dataset" / "d.jsonl"
    path.write_text("\n".join(GOOD % json.dumps(p) for p in ("../pages/x.png", "y.png", "sub/z.png", "./y.png",
                                                              "sub/../y.png")) + "\n")
    assert [e.image.is_file() for e in read_jsonl(path)] == [True] * 5
    for image in ("../../secret.png", "../pages/../../secret.png", "../../../../../../etc/passwd", "/etc/passwd",
                  str(dataset_tree / "secret.png"), str(dataset_tree / "data" / "pages" / "x.png")):
        path.write_text(GOOD % '"y.png"' + "\n" + GOOD % json.dumps(image) + "\n")
        for read in (read_jsonl, lambda p: list(JsonlPages(p, check_images=False).images())):
            with pytest.raises(DatasetError) as e:
                read(path)
            assert f"d.jsonl:2: image path {image!r}" in str(e.value)
            assert "relative to the JSONL file" in str(e.value) and "../pages/" in str(e.value)


def test_build_dataset_refuses_pages_it_could_not_reference(tmp_path):
    """A pages folder outside the dataset folder's parent would be written as a path the reader refuses."""
    labels = labels_for(tmp_path, docs=("a", "b"), pages=1)
    with pytest.raises(DatasetError, match="data.pages_dir .* data.dataset_dir"):
        build_dataset(labels, tmp_path / "pages", tmp_path / "deep" / "er" / "ds", PROMPT, 0.5, 0)


def test_labels_that_are_not_utf8_are_named_by_file_and_line(tmp_path):
    good = json.dumps({"doc": "a", "page": 1, "image": "a_p1.png", "status": "labeled", "text": "t"})
    path = tmp_path / "labels.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.replace('"t"', '"caf\xe9"').encode("latin-1") + b"\n")
    with pytest.raises(ValueError) as e:
        read_labels(path)
    assert f"{path}:2: not UTF-8" in str(e.value) and "codec" not in str(e.value)


def test_infer_jsonl_of_images_from_elsewhere_is_a_dataset_that_reads(tmp_path):
    """`infer --images ~/scans --format jsonl -o out/`: a dataset may only name images in its own tree, so
    pages from elsewhere are copied beside it and the records name the copies."""
    from PIL import Image

    from ocr_finetune.dataset import read_jsonl
    from ocr_finetune.infer import write_document
    from ocr_finetune.teachers.base import PageInput, PageLabel

    scans = tmp_path / "scans"
    scans.mkdir()
    Image.new("RGB", (40, 40), "white").save(scans / "memo.png")
    out = tmp_path / "work" / "ocr" / "out"  # ../../../scans: outside what a dataset may name
    out.mkdir(parents=True)
    label = PageLabel("memo", 1, "memo.png", "labeled", text="# Memo", teacher="api")
    path = write_document("memo", [label], [PageInput("memo", 1, scans / "memo.png")], out, "jsonl")
    [example] = read_jsonl(path)
    assert example.image.resolve() == (out / "pages" / "memo_p1.png").resolve() and example.target == "# Memo"
