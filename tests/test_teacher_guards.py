"""Output guards (clean wrappers, catch loops) and the local-model teacher on a tiny real model."""

from ocr_finetune.params import validate_params
from ocr_finetune.teachers import get_teacher
from ocr_finetune.teachers.quality import clean_output, degenerate_reason, repeat_fraction

from conftest import ROOT
from test_api_teacher import make_pages

GROUNDED = ("<|ref|>title<|/ref|><|det|>[[12, 20, 500, 60]]<|/det|>\n# Annual Report\n\n"
            "<|ref|>table<|/ref|><|det|>[[12, 80, 500, 300]]<|/det|>\n| a | b |\n| --- | --- |\n| 1 | 2 |")
PROSE = ("Revenue grew by twelve percent in the second quarter, driven by subscriptions in Korea and Japan, "
         "while operating costs fell after the move to the new data centre. The board proposes a dividend "
         "of 1.20 EUR per share, payable in May, and expects the third quarter to follow the same trend.")
TABLE = "\n".join(["| item | qty | price |", "| --- | --- | --- |"] +
                  [f"| part {i} | {i * 3} | {i * 1.5:.2f} |" for i in range(40)])


def test_grounding_tags_and_fences_are_removed():
    assert clean_output(GROUNDED) == "# Annual Report\n\n| a | b |\n| --- | --- |\n| 1 | 2 |"
    assert clean_output("```markdown\n# Title\n\ntext\n```") == "# Title\n\ntext"
    assert clean_output("# Title<｜end▁of▁sentence｜>") == "# Title"


def test_loops_are_caught_and_real_pages_are_not():
    loop = PROSE + " " + "The total is 12. " * 60
    assert repeat_fraction(loop) > 0.5 and "looping" in degenerate_reason(loop, "stop", 0.5)
    assert repeat_fraction(PROSE) == 0.0 and degenerate_reason(PROSE, "stop", 0.5) is None
    assert degenerate_reason(TABLE, "stop", 0.5) is None  # repeated pipes and separators are not a loop
    assert "max_tokens" in degenerate_reason(PROSE, "length", 0.5)


def test_local_teacher_labels_caches_and_guards(tmp_path, models_cache):
    pages = make_pages(tmp_path / "pages", {"memo": 2})
    params = validate_params({
        "model": {"cache_dir": str(models_cache)},
        "teacher": {"kind": "local", "prompts_file": str(ROOT / "config" / "prompts.yaml"), "cache_dir": str(tmp_path / "cache"),
                    "local": {"max_new_tokens": 6, "batch_size": 2, "device": "cpu"}}})
    teacher = get_teacher(params)
    labels = sorted(teacher.label(pages), key=lambda x: x.page)
    # A random tiny model never says EOS within 6 tokens: runaway answers, kept to look at, not trained on.
    assert [x.status for x in labels] == ["degenerate", "degenerate"]
    assert all("max_tokens" in x.reason and x.text is not None for x in labels)
    assert len(teacher.cache) == 2

    again = get_teacher(params)
    assert [x.status for x in sorted(again.label(pages), key=lambda x: x.page)] == ["degenerate", "degenerate"]
    assert again._model is None  # answered from the cache: the model was never loaded
