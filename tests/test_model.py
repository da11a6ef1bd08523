import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ocr_finetune.lora import attach_lora, load_adapter
from ocr_finetune.models import get_family
from ocr_finetune.models.base import ModelLoadError, load_image
from ocr_finetune.models.deepseek_ocr2 import checkpoint_dir, encode_example, load_model, load_processor
from PIL import Image, ImageDraw

family = get_family("deepseek-ocr2")


def page(color="black", size=(300, 400)):
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle([20, 20, size[0] - 20, size[1] // 2], fill=color)
    return im


def test_tiny_checkpoint_is_a_real_checkpoint(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json"):
        assert (tiny_dir / name).is_file() or name == "processor_config.json" and any(
            tiny_dir.glob("*processor*")), name
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "DeepseekOcr2ForConditionalGeneration"
    assert type(processor).__name__ == "DeepseekOcr2Processor"
    assert type(processor.image_processor).__name__ == "DeepseekOcr2ImageProcessorPil"
    tok = processor.tokenizer
    text = "# 표 Table | a | b |\n- 항목"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<image>")


def test_labels_mask_bos_prompt_and_image_tokens(tiny_dir):
    processor = load_processor(tiny_dir, "nocrop")
    ex = encode_example(processor, page(), "<image>\nFree OCR.", "# Hello", max_label_tokens=64)
    tok = processor.tokenizer
    n_image = int((ex.input_ids == tok.convert_tokens_to_ids("<image>")).sum())
    assert n_image == 145  # one 768px view: 144 queries + the view separator
    assert ex.input_ids[0] == tok.bos_token_id
    target = tok("# Hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    supervised = ex.labels[ex.labels != -100].tolist()
    assert supervised == target
    assert ex.input_ids[-len(target):].tolist() == target
    assert (ex.labels[: len(ex.input_ids) - len(target)] == -100).all()


def test_gundam_resolution_tiles_pages(tiny_dir):
    processor = load_processor(tiny_dir, "gundam")
    ex = encode_example(processor, page(size=(1200, 1600)), "<image>\nFree OCR.", "x", max_label_tokens=8)
    n_tiles = ex.pixel["num_local_patches"][0]
    assert n_tiles >= 2
    n_image = int((ex.input_ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert n_image == 256 + 144 * n_tiles + 1


def test_adapter_with_missing_tensors_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    tuned = attach_lora(load_model(tiny_dir, torch.float32, "cpu"), family.lora_targets("llm"), 8, 16, 0.0)
    tuned.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for i, (k, v) in enumerate(sorted(weights.items())) if i > 1},
              tmp_path / "adapter_model.safetensors")
    with pytest.raises(RuntimeError, match="lacks 2 LoRA tensors"):
        load_adapter(load_model(tiny_dir, torch.float32, "cpu"), tmp_path)


def test_missing_hub_model_offline_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="huggingface-cli download"):
        checkpoint_dir("deepseek-community/DeepSeek-OCR-2", tmp_path, allow_download=True)
    with pytest.raises(ModelLoadError, match="allow_download is false"):
        checkpoint_dir("deepseek-community/DeepSeek-OCR-2", tmp_path, allow_download=False)


def test_missing_or_broken_image_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="page image not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
