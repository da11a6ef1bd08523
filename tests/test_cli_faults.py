"""The command line where users go wrong: a missing file, failed pages, options without help. In-process."""

import json
from importlib.metadata import version

import pytest
import yaml
from PIL import Image

from conftest import ROOT
from openai_server import ScriptedOpenAI, image_id
from test_api_teacher import KEY, api_config_file
from test_pdf import one_page_pdf

from ocr_finetune.cli import build_parser, main


def test_version_and_help_on_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and version("ocr-finetune") in capsys.readouterr().out
    parser = build_parser()
    [sub] = [a for a in parser._actions if a.choices and isinstance(a.choices, dict)]
    missing = [f"{name} {a.option_strings[0]}" for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and a.dest != "help" and not (a.help or "").strip()]
    assert not missing, missing


def test_pdf2img_missing_source_is_one_line_and_a_skipped_pdf_is_named_once(tmp_path, capsys):
    assert main(["pdf2img", "--pdf", str(tmp_path / "missing.pdf"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing.pdf" in err and len(err.strip().splitlines()) == 1

    one_page_pdf(tmp_path / "pdfs" / "good.pdf", "Good")
    (tmp_path / "pdfs" / "empty.pdf").write_bytes(b"")
    assert main(["pdf2img", "--pdf", str(tmp_path / "pdfs"), "-o", str(tmp_path / "out"), "--dpi", "30",
                 "--workers", "1"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "empty.pdf" in line]
    assert len(lines) == 1 and lines[0].startswith("skipped empty.pdf: not a readable PDF"), out


def test_infer_renders_at_the_dpi_of_the_params_in_effect(tmp_path):
    """`infer --pdf` rendered at 200 dpi whatever params.yaml said (the pipeline's: 100)."""
    one_page_pdf(tmp_path / "report.pdf", "Report text")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pdf2img": {"dpi": 40}}))
    (tmp_path / "pdf_text.yaml").write_text(yaml.safe_dump({"teacher": {"kind": "pdf_text"}}))
    assert main(["infer", "--params", str(tmp_path / "params.yaml"), "--config", str(tmp_path / "pdf_text.yaml"),
                 "--pdf", str(tmp_path / "report.pdf"), "-o", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "pages" / "manifest.json").read_text())["pages"][0]["dpi"] == 40
    assert "Report text" in (tmp_path / "out" / "report.md").read_text()


def test_infer_exits_nonzero_when_pages_failed_and_keeps_what_succeeded(tmp_path, monkeypatch, capsys):
    """A server that fails pages (or is down) used to end `infer` with exit 0, as if all were transcribed."""
    monkeypatch.setenv("TEST_OCR_KEY", KEY)
    (tmp_path / "in").mkdir()
    for name in ("good_p1.png", "good_p2.png", "bad_p1.png"):
        Image.new("RGB", (120, 160), "white" if name.startswith("good") else "gray").save(tmp_path / "in" / name)
    with ScriptedOpenAI({image_id(tmp_path / "in" / "bad_p1.png"): ["500"]}) as server:
        cfg = api_config_file(tmp_path, server, max_retries=0)
        assert main(["infer", "--params", str(ROOT / "params.yaml"), "--config", str(cfg), "--images",
                     str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 1
    assert "1 of 3 pages failed" in capsys.readouterr().out
    assert "Text of page" in (tmp_path / "out" / "good.md").read_text()
    assert "failed" in (tmp_path / "out" / "bad.md").read_text()


def test_set_wins_over_the_teacher_config(tmp_path):
    """`infer --config teacher.yaml -S teacher.api.base_url=...`: -S is applied after the config, not lost."""
    from ocr_finetune.cli import _params

    cfg = tmp_path / "teacher.yaml"
    cfg.write_text("type: api\napi:\n  base_url: http://config:8000/v1\n  model_name: m\n"
                   "request:\n  timeout: 30\n")
    args = build_parser().parse_args(["infer", "--params", str(ROOT / "params.yaml"), "--config", str(cfg),
                                      "-S", "teacher.api.base_url=http://cli:9000/v1", "-S", "model.base=ckpt"])
    params = _params(args)
    assert params.teacher.api.base_url == "http://cli:9000/v1" and params.model.base == "ckpt"
    assert params.teacher.api.timeout == 30 and params.teacher.kind == "api"  # the rest of the config holds


def test_infer_follows_teacher_kind_and_warns_before_the_random_model(tmp_path, capsys, models_cache):
    """Without --config, `-S teacher.kind=pdf_text` reads the PDF's text layer (it used to run the random tiny
    model regardless); the tiny model itself only runs with a warning saying its output is noise."""
    one_page_pdf(tmp_path / "memo.pdf", "Quarterly figures are in")
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["cache_dir"] = str(models_cache)
    raw["teacher"]["cache_dir"] = str(tmp_path / "answers")
    params.write_text(yaml.safe_dump(raw))
    base = ["infer", "--params", str(params), "--pdf", str(tmp_path / "memo.pdf"), "--dpi", "30"]
    assert main([*base, "-o", str(tmp_path / "text"), "-S", "teacher.kind=pdf_text"]) == 0
    assert "Quarterly figures are in" in (tmp_path / "text" / "memo.md").read_text()
    assert "WARNING" not in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "model"), "-S", "teacher.kind=local", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: model.base is `tiny`, a random model" in err and (tmp_path / "model" / "memo.md").is_file()
