import json

import pytest

from ocr_finetune.dataset import DatasetError, build_dataset, read_jsonl, split_documents
from ocr_finetune.teachers.base import PageLabel

PROMPT = "<image>\nFree OCR."


def labels_for(tmp_path, docs=("a", "b", "c", "d", "e", "f"), pages=2):
    out = []
    (tmp_path / "pages").mkdir()
    for d in docs:
        for n in range(1, pages + 1):
            (tmp_path / "pages" / f"{d}_p{n}.png").write_bytes(b"png")
            out.append(PageLabel(d, n, f"{d}_p{n}.png", "labeled", text=f"# {d} page {n}"))
    out.append(PageLabel("scan", 1, "scan_p1.png", "unlabeled", reason="no text layer"))
    return out


def test_split_is_by_document_and_deterministic():
    docs = [f"doc{i}" for i in range(10)]
    train, held = split_documents(docs, 0.3, seed=0)
    assert len(held) == 3 and not train & held and train | held == set(docs)
    assert split_documents(list(reversed(docs)), 0.3, seed=0) == (train, held)
    assert split_documents(docs, 0.3, seed=1) != (train, held)
    assert split_documents(["only"], 0.5, 0) == ({"only"}, set())


def test_build_writes_seed_format_with_relative_images(tmp_path):
    summary = build_dataset(labels_for(tmp_path), tmp_path / "pages", tmp_path / "ds", PROMPT, 0.34, 0)
    assert summary["train"]["pages"] + summary["eval"]["pages"] == 12
    assert summary["skipped_pages"][0]["doc"] == "scan"
    line = (tmp_path / "ds" / "train.jsonl").read_text().splitlines()[0]
    rec = json.loads(line)
    user, assistant = rec["messages"]
    assert user["role"] == "<|User|>" and user["content"] == PROMPT
    assert assistant["role"] == "<|Assistant|>" and assistant["content"].startswith("# ")
    assert user["images"][0].startswith("../pages/")
    assert (tmp_path / "ds" / user["images"][0]).resolve() == (tmp_path / "pages" / user["images"][0][9:]).resolve()
    train = read_jsonl(tmp_path / "ds" / "train.jsonl")
    held = read_jsonl(tmp_path / "ds" / "eval.jsonl")
    assert {e.doc for e in train}.isdisjoint({e.doc for e in held})
    assert all(e.image.is_file() for e in train + held)


@pytest.mark.parametrize("line, message", [
    ('{"messages": [', "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "<image>", "images": ["x.png"]},'
     ' {"role": "<|Assistant|>", "content": "t"}]}', "roles must be"),
    ('{"messages": [{"role": "<|User|>", "content": "no placeholder", "images": ["x.png"]},'
     ' {"role": "<|Assistant|>", "content": "t"}]}', "<image>"),
    ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": ["x.png"]},'
     ' {"role": "<|Assistant|>", "content": "  "}]}', "empty"),
    ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": ["missing.png"]},'
     ' {"role": "<|Assistant|>", "content": "t"}]}', "image not found"),
    ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": ["x.png"]},'
     ' {"role": "<|Assistant|>", "content": "t"}], "meta": {"page": "two"}}', "meta.page"),
    ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": ["x.png"]},'
     ' {"role": "<|Assistant|>", "content": "t"}], "meta": "x"}', '"meta" must be an object'),
])
def test_malformed_lines_are_named(tmp_path, line, message):
    (tmp_path / "x.png").write_bytes(b"png")
    good = ('{"messages": [{"role": "<|User|>", "content": "<image>", "images": ["x.png"]},'
            ' {"role": "<|Assistant|>", "content": "t"}]}')
    path = tmp_path / "d.jsonl"
    path.write_text(good + "\n" + good + "\n" + line + "\n")
    with pytest.raises(DatasetError) as e:
        read_jsonl(path)
    assert f"d.jsonl:3:" in str(e.value) and message in str(e.value)


def test_labels_of_a_stopped_labelling_run_are_refused(tmp_path):
    """labels.jsonl of a run stopped at page 3 of 12: the dataset would silently lose 9 pages."""
    labels = labels_for(tmp_path)
    pages = [{"doc": x.doc, "page": x.page, "image": x.image, "width": 1, "height": 1, "has_text": True}
             for x in labels]
    (tmp_path / "pages" / "manifest.json").write_text(json.dumps({"dpi": 100, "format": "png", "pages": pages}))
    build_dataset(labels, tmp_path / "pages", tmp_path / "ds", PROMPT, 0.3, 0)  # complete: fine
    with pytest.raises(DatasetError, match="cover 3 of 13 rendered pages"):
        build_dataset(labels[:3], tmp_path / "pages", tmp_path / "ds2", PROMPT, 0.3, 0)


def test_labels_with_unicode_line_separators_survive_the_round_trip(tmp_path):
    """U+2028, U+2029 and U+0085 are text inside a JSON string (a PDF's text layer has them); the files are
    written without escaping them, so reading must split records at newlines only."""
    from dataclasses import asdict

    from ocr_finetune.teachers import read_labels

    text = "line one\u2028line two\u2029end\u0085."
    labels = labels_for(tmp_path, docs=("a", "b"), pages=1)
    labels[0].text = text
    (tmp_path / "labels.jsonl").write_text(  # as label_pages writes it
        "".join(json.dumps(asdict(x), ensure_ascii=False) + "\n" for x in labels), encoding="utf-8")
    assert read_labels(tmp_path / "labels.jsonl")[0].text == text
    build_dataset(labels, tmp_path / "pages", tmp_path / "ds", PROMPT, 0.5, 0)
    targets = [e.target for f in ("train", "eval") for e in read_jsonl(tmp_path / "ds" / f"{f}.jsonl")]
    assert text in targets
