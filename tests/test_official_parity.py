"""Inputs and decoding as the official DeepSeek-OCR inference code makes them (issue 17)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ocr_finetune.decoding import WindowedNoRepeatNGram, decode_generated, exempt_ids
from ocr_finetune.models import get_family


def normalised(image: Image.Image, processor) -> torch.Tensor:
    x = torch.tensor(np.asarray(image.convert("RGB"))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
    return (x - mean[:, None, None]) / std[:, None, None]


@pytest.mark.parametrize("family_name,fixture,preset,side", [
    ("deepseek-ocr2", "tiny_dir", "gundam", 1024), ("deepseek-ocr", "tiny_v1_dir", "large", 1280),
    ("deepseek-ocr", "tiny_v1_dir", "gundam", 1024)])
def test_global_view_is_pil_imageops_pad(request, family_name, fixture, preset, side):
    """The padded global view equals `ImageOps.pad(page, (side, side), color=mean)`, pixel for pixel, over
    a sweep of page sizes (odd and even margins, portrait and landscape, US letter and A4 at 150 dpi)."""
    family = get_family(family_name)
    processor = family.load_processor(request.getfixturevalue(fixture), preset).image_processor
    color = tuple(int(c) for c in processor.background_color)
    rng = random.Random(0)
    sizes = [(1275, 1650), (1240, 1754), (1700, 2200), (2000, 999)] + [
        (rng.randint(300, 2400), rng.randint(300, 2400)) for _ in range(12)]
    for w, h in sizes:
        page = Image.fromarray(np.random.RandomState(w * h % 2**31).randint(0, 255, (h, w, 3), dtype=np.uint8))
        ours = processor(page, return_tensors="pt")["pixel_values"][0].float()
        official = normalised(ImageOps.pad(page, (side, side), method=Image.Resampling.BICUBIC, color=color),
                              processor)
        assert torch.equal(ours, official), (w, h, (ours - official).abs().max())


def test_deepseek_ocr2_without_tiles_stretches_the_page(tiny_dir):
    """DeepSeek-OCR-2 `nocrop`: the page resized to 768x768 (the official non-crop input), not padded."""
    family = get_family("deepseek-ocr2")
    processor = family.load_processor(tiny_dir, "nocrop").image_processor
    page = Image.fromarray(np.random.RandomState(1).randint(0, 255, (1754, 1240, 3), dtype=np.uint8))
    ours = processor(page, return_tensors="pt")["pixel_values"][0].float()
    assert torch.equal(ours, normalised(page.resize((768, 768), Image.Resampling.BICUBIC), processor))


def test_decoding_keeps_table_and_grounding_tags(tiny_dir):
    """The tokenizer marks `<td>`, `<tr>` and the grounding tags special, as DeepSeek-OCR's does; decoding
    keeps them and stops at the end marker, as the official code does."""
    from ocr_finetune.teachers.quality import clean_output

    tok = get_family("deepseek-ocr2").load_processor(tiny_dir, "gundam").tokenizer
    special = {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {"<td>", "</td>", "<tr>", "</tr>", "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>"} <= special
    text = "<|ref|>title<|/ref|><|det|>[[330, 198, 559, 230]]<|/det|>\n# Title\n<table><tr><td>a</td><td>b</td></tr></table>"
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] + [tok.pad_token_id] * 3)
    decoded, stopped = decode_generated(tok, ids)
    assert stopped and decoded == text
    assert "<td>" not in tok.decode(ids, skip_special_tokens=True)  # what decoding did before: tables lost
    assert clean_output(decoded) == "# Title\n<table><tr><td>a</td><td>b</td></tr></table>"
    assert decode_generated(tok, ids[:5])[1] is False


def official_banned(token_ids, ngram_size, window, whitelist):
    """The official NoRepeatNGramLogitsProcessor's rule (DeepSeek-OCR's vLLM code), over generated ids."""
    if len(token_ids) < ngram_size:
        return set()
    prefix = tuple(token_ids[-(ngram_size - 1):])
    banned = set()
    for i in range(max(0, len(token_ids) - window), len(token_ids) - ngram_size + 1):
        gram = tuple(token_ids[i:i + ngram_size])
        if gram[:-1] == prefix:
            banned.add(gram[-1])
    return banned - set(whitelist)


@pytest.mark.parametrize("ngram_size,window", [(20, 50), (30, 90), (3, 10), (2, 90)])
def test_windowed_no_repeat_bans_what_the_official_guard_bans(ngram_size, window):
    rng = random.Random(ngram_size * window)
    vocab, width, batch = 12, 5, 6
    exempt = [3, 4]
    guard = WindowedNoRepeatNGram(ngram_size, window, width, exempt)
    for length in (1, ngram_size - 1, ngram_size, window - 1, window + 7, 3 * window):
        rows = []
        for _ in range(batch):  # a looping pattern in some rows, noise in others
            period = rng.choice([1, 2, 3, 7, None])
            row = [rng.randrange(vocab) if period is None else (k % period) + 2 for k in range(length)]
            rows.append(row)
        prompt = torch.randint(0, vocab, (batch, width))
        scores = guard(torch.cat([prompt, torch.tensor(rows)], 1), torch.zeros(batch, vocab))
        for b, row in enumerate(rows):
            got = set(torch.nonzero(torch.isinf(scores[b])).flatten().tolist())
            assert got == official_banned(row, ngram_size, window, exempt), (length, row)


def test_exempt_ids_are_the_table_cell_tags(tiny_dir):
    tok = get_family("deepseek-ocr2").load_processor(tiny_dir, "gundam").tokenizer
    assert exempt_ids(tok) == [tok.convert_tokens_to_ids("<td>"), tok.convert_tokens_to_ids("</td>")]
