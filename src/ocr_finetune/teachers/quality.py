"""Guards on what a teacher returns: clean model-specific wrappers to plain Markdown, and refuse loops.

Looping output is the most reported failure of these models (repeated lines until max_tokens); a looping
label trained on teaches the student to loop, so such pages are marked `degenerate` and left out.
"""

from __future__ import annotations

import re
import unicodedata

from .base import PageInput, PageLabel

# DeepSeek-OCR grounding output: <|ref|>label<|/ref|><|det|>[[x1, y1, x2, y2]]<|/det|> before each block.
_GROUNDING = re.compile(r"<\|ref\|>.*?<\|/ref\|>|<\|det\|>.*?<\|/det\|>", re.DOTALL)
_SPECIAL = re.compile(r"<\|grounding\|>|<｜end▁of▁sentence｜>|<\|end_of_sentence\|>")
# The whole answer in one fence, perhaps with the closing fence right after the last line, perhaps after a
# one-line preamble ("Here is the Markdown:") but then only before a ```markdown fence: a page may itself end
# with a caption line and an untagged code block ("Listing 1: hello world in C:")
_FENCE = re.compile(r"\A(?:\s*```(?:markdown|md)?|[^\n`]{0,200}:\s*\n\s*```(?:markdown|md))[ \t]*\n(.*?)\n?```\s*\Z",
                    re.DOTALL)
# reasoning models (DeepSeek-R1, Qwen3 and others served without a reasoning parser) think in the content
_THINKING = re.compile(r"\A\s*<think>.*?(?:</think>|\Z)", re.DOTALL)


def clean_output(text: str) -> str:
    text = _SPECIAL.sub("", _GROUNDING.sub("", _THINKING.sub("", text)))
    fenced = _FENCE.match(text)
    if fenced and "```" not in fenced.group(1):  # chat models often wrap the whole answer in a ```markdown fence
        text = fenced.group(1)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


# an HTML tag: a letter after `<`, on one line ("x < 5 ... y > 3" is text)
HTML_TAG = re.compile(r"</?[A-Za-z][^<>\n]*>")


def _unspaced_script(c: str) -> bool:
    """Chinese, Japanese, Korean (wide) or Thai, Lao, Khmer, Myanmar: scripts written without word spaces."""
    return unicodedata.east_asian_width(c) in "WF" or "\u0e00" <= c <= "\u0eff" or "\u1780" <= c <= "\u17ff" or (
        "\u1000" <= c <= "\u109f")


def repeat_fraction(text: str, n: int = 8) -> float:
    """Share of word n-grams that repeat an earlier one: ~0 for prose and tables, near 1 for a loop. Text
    mostly in a script written without spaces (Chinese, Japanese, Thai) has too few words: its n-grams are
    of characters (n + 2 of them, about as long as n words). HTML tags are left out."""
    text = HTML_TAG.sub(" ", text)  # HTML table tags (`</td><td>`) repeat in any table: not a loop
    words = text.split()
    letters = [c for c in text if c.isalpha()]
    if letters and sum(_unspaced_script(c) for c in letters) > len(letters) / 2:
        words, n = [c for c in text if not c.isspace()], n + 2
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if len(grams) < 20:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def degenerate_reason(text: str, finish_reason: str | None, max_repeat_fraction: float) -> str | None:
    """Why an answer must not be trained on, or None."""
    if finish_reason == "length":
        return "runaway output: stopped at max_tokens"
    if finish_reason == "content_filter":
        return "cut by the server's content filter"
    if finish_reason == "refusal":
        return "the model refused"
    if not text.strip():
        return "empty answer"
    fraction = repeat_fraction(text)
    if fraction >= max_repeat_fraction:
        return f"looping output: {fraction:.0%} of its 8-grams repeat"
    return None


def answer_label(page: PageInput, entry: dict, teacher: str, max_repeat_fraction: float) -> PageLabel:
    """A teacher's raw answer ({text, finish_reason}) as a label: cleaned, and marked degenerate if it loops."""
    text = clean_output(entry["text"])
    reason = degenerate_reason(text, entry.get("finish_reason"), max_repeat_fraction)
    if reason and entry.get("refusal"):
        reason += f": {entry['refusal']}"
    status = "degenerate" if reason else "labeled"
    return PageLabel(page.doc, page.page, page.image.name, status, text=text, reason=reason, teacher=teacher)
