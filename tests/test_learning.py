"""The learning test: a tiny real model, trained on two pages, transcribes each page as its own label.

If image features, prompt and labels did not line up (image tokens unmasked, labels shifted, the image
ignored), the model could at best emit one text for both pages and this test would fail.
"""

import pymupdf

from ocr_finetune.dataset import build_dataset
from ocr_finetune.infer import LocalModel, transcribe_paths
from ocr_finetune.metrics import cer
from ocr_finetune.params import validate_params
from ocr_finetune.pdf import render_pages
from ocr_finetune.teachers.base import PageLabel

# the invoice's table cells are special tokens in this tokenizer, as in DeepSeek-OCR's: read back only if
# decoding keeps special tokens, as the official code does
LABELS = {"invoice": "# Invoice\n\n<table><tr><td>Total</td><td>120 EUR</td></tr></table>",
          "memo": "# 회의록\n\n- 참석: 김민수"}


def make_pdfs(folder):
    """Two pages a small random vision tower can tell apart: ink in the top half vs the bottom half."""
    folder.mkdir()
    for name, box in (("invoice", (40, 40, 555, 380)), ("memo", (40, 460, 555, 800))):
        doc = pymupdf.open()
        page = doc.new_page(width=595, height=842)
        page.draw_rect(pymupdf.Rect(*box), color=(0, 0, 0), fill=(0, 0, 0))
        page.insert_text((60, 420), name, fontsize=24)
        doc.save(folder / f"{name}.pdf")


def test_tiny_model_learns_to_read_two_pages(tmp_path, models_cache):
    make_pdfs(tmp_path / "pdfs")
    manifest = render_pages(tmp_path / "pdfs", tmp_path / "pages", dpi=40, progress=False)
    labels = [PageLabel(p.doc, p.page, p.image, "labeled", text=LABELS[p.doc]) for p in manifest.pages]
    prompt = "<image>\nFree OCR."
    build_dataset(labels, tmp_path / "pages", tmp_path / "ds", prompt, eval_fraction=0.0, seed=0)

    params = validate_params({
        "model": {"cache_dir": str(models_cache)},
        "lora": {"mode": "llm", "r": 16, "alpha": 32},
        "train": {"max_steps": 60, "batch_size": 2, "learning_rate": 3e-3, "output_dir": str(tmp_path / "adapter")},
        "tracking": {"enabled": False},
    })
    from ocr_finetune.train import train

    result = train(params, tmp_path / "ds" / "train.jsonl", progress=False)
    assert result.losses[-1] < result.losses[0]

    # Reload from disk exactly as evaluate/infer do, then read both pages.
    model = LocalModel(params, adapter_dir=tmp_path / "adapter", device="cpu")
    pages = sorted((tmp_path / "pages").glob("*.png"))
    outputs = {p.name.split("_p")[0]: text for p, text in
               transcribe_paths(model, pages, prompt, max_new_tokens=48, progress=False)}
    for doc, label in LABELS.items():
        assert cer(label, outputs[doc]) <= 0.1, (doc, outputs)
    assert outputs["invoice"] != outputs["memo"]
