import json
import os

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from ocr_finetune.lora import attach_lora, load_adapter
from ocr_finetune.models import get_family
from ocr_finetune.models.base import ModelLoadError, checkpoint_source, load_image, resolve_checkpoint
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


def test_building_the_tiny_model_leaves_the_random_state_alone(tmp_path):
    """Training must not depend on whether models/base/tiny existed: its first build (in the training process)
    used to reseed torch, so a fresh clone's demo trained another adapter than later runs."""
    from ocr_finetune.models.deepseek_ocr2 import build_tiny

    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny(tmp_path / "tiny")
    assert torch.equal(torch.rand(4), expected)


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


def test_a_label_cut_to_max_label_tokens_does_not_end_with_eos(tiny_dir):
    """The model must not learn to stop mid-page: a label cut at train.max_label_tokens keeps its first
    tokens without EOS; one that fits ends with EOS. Both say how long the whole label was."""
    processor = load_processor(tiny_dir, "nocrop")
    tok = processor.tokenizer
    text = "word " * 40
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cut = encode_example(processor, page(), "<image>\nFree OCR.", text, max_label_tokens=8)
    assert cut.labels[cut.labels != -100].tolist() == ids[:8] and cut.label_tokens == len(ids)
    whole = encode_example(processor, page(), "<image>\nFree OCR.", text, max_label_tokens=len(ids))
    assert whole.labels[whole.labels != -100].tolist() == ids + [tok.eos_token_id]


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
    with pytest.raises(ModelLoadError, match="`hf download deepseek-community/DeepSeek-OCR-2 --local-dir"):
        checkpoint_dir("deepseek-community/DeepSeek-OCR-2", tmp_path, allow_download=True)
    with pytest.raises(ModelLoadError, match="allow_download is false"):
        checkpoint_dir("deepseek-community/DeepSeek-OCR-2", tmp_path, allow_download=False)


def test_unreachable_hub_is_one_clear_error(tmp_path):
    """The hub's address refuses connections (a proxy down, a firewall): a ModelLoadError that says how to
    download by hand, not the HTTP client's traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("from ocr_finetune.models.base import ModelLoadError, resolve_checkpoint\n"
            "try:\n"
            f"    resolve_checkpoint('acme/ocr', {str(tmp_path)!r}, True, '1 GB')\n"
            "except ModelLoadError as e:\n"
            "    print('ERROR', e)\n")
    def resolve_against(endpoint):
        env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint}
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    out = resolve_against(f"http://127.0.0.1:{port}")
    assert "ERROR could not download acme/ocr" in out and "`hf download acme/ocr --local-dir" in out

    # a hub that answers, but has no such repository (or it is gated): the advice is about the name and token
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"error": "Repository not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = resolve_against(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert "ERROR the Hugging Face Hub refused acme/ocr" in out and "HF_TOKEN" in out


def test_partly_downloaded_checkpoint_is_not_loaded(tmp_path):
    target = tmp_path / "acme--ocr"
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (target / "model-00001-of-00002.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="only partly"):
        resolve_checkpoint("acme/ocr", tmp_path, allow_download=False, size_hint="1 GB")
    (target / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert resolve_checkpoint("acme/ocr", tmp_path, allow_download=False, size_hint="1 GB") == target
    partial = target / ".cache" / "huggingface" / "download" / "tokenizer.json.incomplete"  # cut off mid-file
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="only partly"):
        resolve_checkpoint("acme/ocr", tmp_path, allow_download=False, size_hint="1 GB")
    partial.unlink()
    (target / "model.safetensors.index.json").unlink()  # shards before their index
    with pytest.raises(ModelLoadError, match="only partly"):
        resolve_checkpoint("acme/ocr", tmp_path, allow_download=False, size_hint="1 GB")


def test_checkpoint_revision_from_hand_downloads(tmp_path):
    """`hf download --local-dir` keeps each file's commit in .cache/huggingface/download/*.metadata."""
    folder = tmp_path / "by-hand"
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    commit = "a" * 40
    (meta / "config.json.metadata").write_text(f"{commit}\n{'b' * 40}\n1712656091.123\n")
    assert checkpoint_source(folder) == {"path": str(folder), "revision": commit}
    assert checkpoint_source(tmp_path) == {"path": str(tmp_path)}


def test_missing_or_broken_image_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="page image not found"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "bad.png")
