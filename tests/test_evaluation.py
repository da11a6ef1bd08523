"""Evaluation scores, the HTML report in a real headless browser, and the pull-request metrics comment."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

from conftest import ROOT

from ocr_finetune.metrics import cer, ned, page_scores, summarize_system, teds
from ocr_finetune.report import char_diff, write_report

TABLE = "| item | qty |\n| --- | --- |\n| pens | 12 |\n| ink | 3 |"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_scores_agree_with_their_definitions():
    assert ned("abcd", "abcx") == 0.25 and ned("", "") == 0.0 and ned("ab", "") == 1.0
    looping = "Total 12. " * 50
    s = page_scores("Total 12.", looping)
    assert s["cer"] > 10 and s["cer_clipped"] == 1.0 and s["loop"] and s["length_ratio"] > 40
    assert cer("한국어 회의록", "한국어 회의록".encode().decode()) == 0.0
    import unicodedata

    assert cer("회의록", unicodedata.normalize("NFD", "회의록")) == 0.0  # NFC on both sides
    assert cer("# **Title**", "Title", markdown="strip") == 0.0 and cer("# **Title**", "Title") > 0


def test_teds_reads_markdown_and_html_tables():
    assert teds("no table here", "anything") is None
    assert teds(TABLE, TABLE) == 1.0
    html = "<table><tr><td>item</td><td>qty</td></tr><tr><td>pens</td><td>12</td></tr><tr><td>ink</td><td>3</td></tr></table>"
    assert teds(TABLE, html) == 1.0  # same structure and cells, other syntax
    one_cell_wrong = teds(TABLE, TABLE.replace("12", "21"))
    row_missing = teds(TABLE, "| item | qty |\n| --- | --- |\n| pens | 12 |")
    assert 0.9 < one_cell_wrong < 1.0 and row_missing < one_cell_wrong
    assert teds(TABLE, "item qty pens 12 ink 3") == 0.0


def test_summary_reports_mean_median_clipped_and_loop_rate():
    pages = [page_scores("abc", "abc"), page_scores("abc", "abd"), page_scores("abc", "zzz " * 40)]
    s = summarize_system(pages)
    assert s["cer_median"] == pytest.approx(1 / 3, abs=1e-3)
    assert s["cer"] > s["cer_clipped"] == pytest.approx((0 + 1 / 3 + 1) / 3, abs=1e-3)
    assert s["loop_rate"] == pytest.approx(1 / 3, abs=1e-3) and s["teds"] is None


def test_char_diff_marks_what_differs():
    assert char_diff("total 120", "total 12O") == "total 12<del>0</del><ins>O</ins>"
    assert char_diff("<b>", "<b>") == "&lt;b&gt;"
    assert char_diff("a\nb", "a b", any_whitespace_equal=True) == "a b"  # what collapsed whitespace scores


def fake_result(tmp_path):
    images, pages = {}, []
    for i, (ref, base, tuned) in enumerate([("# Invoice\nTotal: 120 EUR", "# Invoce\nTotal 12O", "# Invoice\nTotal: 120 EUR"),
                                           (TABLE, "item qty", TABLE.replace("3", "8"))]):
        im = Image.new("RGB", (600, 800), "white")
        ImageDraw.Draw(im).rectangle([40, 40 + 300 * i, 560, 300 + 300 * i], fill="black")
        images[("doc", i + 1)] = tmp_path / f"doc_p{i + 1}.png"
        im.save(images[("doc", i + 1)])
        pages.append({"doc": "doc", "page": i + 1, "image": str(images[("doc", i + 1)]), "reference": ref,
                      "base": {"output": base, **page_scores(ref, base)},
                      "finetuned": {"output": tuned, **page_scores(ref, tuned)}})
    summary = {"pages": 2, "docs": 1, "base": summarize_system([p["base"] for p in pages]),
               "finetuned": summarize_system([p["finetuned"] for p in pages])}
    return {"summary": summary, "pages": pages}, images


def screenshot(html_file, png, height=1400, env=None):
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={png}",
                        f"--window-size=1280,{height}", "--virtual-time-budget=5000", f"file://{html_file}"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and png.is_file(), r.stderr[-2000:]
    with Image.open(png) as im:
        return im.convert("L")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian chromium (`make browser`); CI installs it")
def test_report_renders_in_a_headless_browser(tmp_path):
    result, _ = fake_result(tmp_path)
    report = write_report(result, tmp_path / "report.html")
    html = report.read_text()
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")  # self-contained
    assert html.index("page 2") < html.index("page 1")  # worst first (the table page)
    assert html.count("data:image/jpeg;base64,") == 2 and "<del>" in html and "<ins>" in html
    shot = screenshot(report, tmp_path / "report.png")
    assert ImageStat.Stat(shot).stddev[0] > 20  # text, images and highlights drawn, not a blank page
    # the red of <del> and the green of <ins> are on screen
    with Image.open(tmp_path / "report.png") as im:
        colors = {c for _, c in im.convert("RGB").getcolors(1 << 20)}
    assert (255, 215, 213) in colors and (210, 244, 211) in colors


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t"})


def test_pull_request_comment_shows_both_values_and_the_change(tmp_path):
    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    git(repo, "init", "-q")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["dvc", "init", "-q"], cwd=repo, check=True, env=env)
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/eval.json\n")
    (repo / "params.yaml").write_text("lora:\n  mode: both\n")
    (repo / "metrics" / "eval.json").write_text(json.dumps({"finetuned": {"cer": 0.4123, "ned": 0.30}}))
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "base")
    (repo / "metrics" / "eval.json").write_text(json.dumps({"finetuned": {"cer": 0.2061, "ned": 0.15}}))
    (repo / "params.yaml").write_text("lora:\n  mode: llm\n")
    git(repo, "commit", "-qam", "branch")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "metrics_comment.py"), "--base", "HEAD~1",
                        "--head", "HEAD"], cwd=repo, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    body = r.stdout
    assert body.startswith("<!-- ocr-finetune-metrics -->")
    row = next(line for line in body.splitlines() if "finetuned.cer" in line)
    assert "0.4123" in row and "0.2061" in row and "-0.2062" in row  # old, new, change
    assert "lora.mode" in body and "both" in body and "llm" in body


def test_workflow_posts_one_updated_comment():
    import yaml

    flow = yaml.safe_load((ROOT / ".github" / "workflows" / "metrics.yml").read_text())
    assert "pull_request" in flow[True] if True in flow else "pull_request" in flow["on"]
    steps = flow["jobs"]["metrics"]["steps"]
    script = " ".join(str(s.get("run", "")) + str(s.get("with", {}).get("script", "")) for s in steps)
    assert "scripts/metrics_comment.py --base origin/" in script and "updateComment" in script
    assert "make demo" in script


def test_outputs_are_scored_as_infer_writes_them():
    """DeepSeek-OCR's grounding tags (its default prompt asks for them) are no text of the page: a perfect
    reading with tags scored CER 3.4. They are cleaned as `infer` cleans them; the raw output is kept."""
    from ocr_finetune.dataset import Example
    from ocr_finetune.evaluate import score_pages
    from ocr_finetune.params import EvaluateParams

    ref = "# Annual Report\n\nRevenue grew 5%."
    raw = ("<|ref|>title<|/ref|><|det|>[[12, 20, 500, 60]]<|/det|>\n# Annual Report\n\n"
           "<|ref|>text<|/ref|><|det|>[[12, 80, 500, 300]]<|/det|>\nRevenue grew 5%.")
    rows = score_pages([Example(Path("a_p1.png"), "<image>\nFree OCR.", ref, "a", 1)], {"base": [raw]},
                       EvaluateParams())
    assert rows[0]["base"]["cer"] == 0.0 and rows[0]["base"]["raw_output"] == raw
    assert rows[0]["image"] == "a_p1.png"


def test_stripping_markdown_keeps_what_is_printed_on_the_page():
    """`markdown: strip` drops syntax only: wrong digits between a `<` and a `>`, a lost `_` inside a word or
    math, and lost `*` in arithmetic are errors; emphasis, headings, bullets, pipes and tags are not."""
    strip = {"markdown": "strip"}
    assert cer("If x < 5 stop.\nMax load 120 kg.\nElse y > 3.",
               "If x < 5 stop.\nMax load 720 kq.\nElse y > 3.", **strip) > 0
    assert cer("$x_1 + x_2$", "$x1 + x2$", **strip) > 0
    assert cer("call my_func_name", "call myfuncname", **strip) > 0
    assert cer("2*3*4", "234", **strip) > 0
    assert cer("Step 12. Mix", "Step Mix", **strip) > 0
    assert cer("# **Total:** 12\n- *pens* and __ink__ and ***both***\n<b>x</b> `a_b`",
               "Total: 12\npens and ink and both\nx a_b", **strip) == 0.0
    assert cer("**注意**事项", "注意事项", **strip) == 0.0  # bold inside CJK text is still bold
    assert cer("cost $5 and *net* $10", "cost $5 and net $10", **strip) == 0.0  # money, not math


def test_loops_are_found_in_scripts_written_without_spaces():
    from ocr_finetune.teachers.quality import degenerate_reason

    loop = "这是一个重复的句子。" * 300
    assert page_scores("这是一个重复的句子。", loop)["loop"]
    assert degenerate_reason(loop, "stop", 0.5)
    prose = ("深度学习模型在文档理解任务中取得了显著进展，尤其是在光学字符识别领域。研究人员提出了多种方法来提高识别精度，"
             "包括注意力机制、视觉编码器和语言模型的结合。这些方法在公开数据集上表现良好，但在真实场景中仍然面临挑战。")
    assert not page_scores(prose, prose)["loop"] and degenerate_reason(prose, "stop", 0.5) is None
    # an HTML table (DeepSeek-OCR writes them on one line) repeats its tags, not its text
    table = "<table>" + "".join(f"<tr><td>{i}</td><td>-</td><td>0</td></tr>" for i in range(40)) + "</table>"
    assert not page_scores(table, table)["loop"] and degenerate_reason("Staff\n" + table, "stop", 0.5) is None


def test_tables_are_scored_after_the_same_normalisation_and_found_without_outer_pipes():
    import unicodedata

    from ocr_finetune.metrics import TEDS_MAX_CELLS

    table = "| 이름 | 금액 |\n| --- | --- |\n| 회의록 | 12 |"
    assert page_scores(table, unicodedata.normalize("NFD", table))["teds"] == 1.0
    assert teds(table, "이름 | 금액\n--- | ---\n회의록 | 12") == 1.0
    assert teds(TABLE, "item | qty\n--- | ---\npens | 12\nink | 3") == 1.0
    # a merged header read as two cells is a structure error: rename (span differs) + insert, of 8 nodes
    merged = '<table><tr><td colspan="2">Revenue</td></tr><tr><td>2023</td><td>2024</td></tr></table>'
    split = "<table><tr><td>Revenue</td><td></td></tr><tr><td>2023</td><td>2024</td></tr></table>"
    assert teds(merged, merged) == 1.0 and teds(merged, split) == 1 - 2 / 8
    # past the cell budget a table is scored by rows: still 1 when equal, below 1 when a cell differs
    rows = TEDS_MAX_CELLS // 4 + 10
    big = "| a | b | c | d |\n|---|---|---|---|\n" + "\n".join(f"| {r} | x{r} | y{r} | z{r} |" for r in range(rows))
    assert teds(big, big) == 1.0 and 0.9 < teds(big, big.replace("| x1", "| q1")) < 1.0


def test_words_split_at_any_whitespace_and_invisible_characters_are_no_errors():
    from ocr_finetune.metrics import wer

    assert wer("hello\nworld", "hello\nwordl", collapse_whitespace=False) == 0.5
    assert cer("ab\u200bc\u00ad", "abc") == 0.0 and cer("\ufeffTotal", "Total") == 0.0
    assert cer("ab\u200dc", "abc") > 0  # ZWJ shapes Indic and Persian script: kept


def test_corpus_cer_weighs_characters_and_the_mean_weighs_pages():
    pages = [page_scores("ab", "xb"), page_scores("a" * 98, "a" * 98)]
    s = summarize_system(pages)
    assert s["cer"] == 0.25 and s["cer_corpus"] == 0.01


def test_report_diffs_the_texts_as_scored_and_shows_each_rows_own_image(tmp_path):
    """Two rows of one (doc, page) (a JSONL without page numbers) each show their image; the diff of a page
    that scores CER 0 under `markdown: strip` marks nothing."""
    images = []
    for i, color in enumerate(["black", "gray"]):
        images.append(tmp_path / f"im{i}.png")
        Image.new("RGB", (200, 300), color).save(images[-1])
    norm = {"unicode": "NFC", "collapse_whitespace": True, "markdown": "strip"}
    pages = [{"doc": "invoice", "page": 0, "image": str(im), "reference": "# **Title**\n\nText",
              "base": {"output": "Title\r\n\r\n\r\nText", **page_scores("# **Title**\n\nText", "Title\r\nText", **norm)}}
             for im in images]
    result = {"summary": {"pages": 2, "docs": 1, "base": summarize_system([p["base"] for p in pages])},
              "pages": pages, "normalization": norm}
    html = write_report(result, tmp_path / "report.html").read_text()
    urls = re.findall(r'src="(data:image/jpeg;base64,[^"]+)"', html)
    assert len(urls) == 2 and urls[0] != urls[1]
    sections = html[html.index('<section class="page">'):]
    assert "<del>" not in sections and "<ins>" not in sections and "Markdown syntax stripped" in html


def test_metrics_json_has_no_nan(tmp_path):
    from ocr_finetune.models.base import write_json

    write_json(tmp_path / "t.json", {"final_loss": float("nan"), "steps": [1.0, float("inf")]})
    assert json.loads((tmp_path / "t.json").read_text(), parse_constant=lambda c: 1 / 0) == {
        "final_loss": None, "steps": [1.0, None]}


@pytest.mark.skipif(CHROMIUM is None or shutil.which("fc-list") is None,
                    reason="needs Debian chromium (`make browser`); CI installs it")
def test_korean_pages_render_as_glyphs_not_boxes(tmp_path):
    """A report of Korean pages screenshotted twice: as the machine's fonts draw it, and with every font that
    covers Korean hidden from the browser (fontconfig rejects them), where Chromium draws each syllable as a
    box of its code point. The two differ only if the report's Korean was drawn in a Korean font: with none
    installed (no `make browser`) the rejected list is empty and the shots are the same picture."""
    ko = "회의록 안건 예산 승인 일정 담당자 결정 사항"
    result, _ = fake_result(tmp_path)
    for page in result["pages"]:
        page["reference"] = ko
        for system in ("base", "finetuned"):
            page[system] = {"output": ko, **page_scores(ko, ko)}
    report = write_report(result, tmp_path / "report.html")
    korean = subprocess.run(["fc-list", ":lang=ko", "file"], capture_output=True, text=True).stdout.split()
    rejected = "".join(f"<glob>{f.rstrip(':')}</glob>" for f in korean)
    conf = tmp_path / "fonts.conf"
    conf.write_text('<?xml version="1.0"?><!DOCTYPE fontconfig SYSTEM "fonts.dtd"><fontconfig>'
                    f'<include ignore_missing="yes">{os.environ.get("FONTCONFIG_FILE", "/etc/fonts/fonts.conf")}'
                    '</include>'
                    f'<selectfont><rejectfont>{rejected}</rejectfont></selectfont>'
                    f'<cachedir>{tmp_path / "fc-cache"}</cachedir></fontconfig>')
    drawn = screenshot(report, tmp_path / "fonts.png")
    boxes = screenshot(report, tmp_path / "boxes.png", env={**os.environ, "FONTCONFIG_FILE": str(conf)})
    assert ImageChops.difference(drawn, boxes).getbbox() is not None, (
        "the report's Korean is drawn as boxes: no Korean font (make browser installs fonts-nanum)")
