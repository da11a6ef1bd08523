"""Export: merged weights under the original checkpoint names that compute what base + adapter computes, and
an `llm` adapter renamed for vLLM whose every tensor maps back to a weight of the original checkpoint."""

import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ocr_finetune.export import checkpoint_keys, export_merged, export_vllm_lora
from peft import PeftModel

from ocr_finetune.lora import attach_lora_from_params, load_adapter, save_adapter
from ocr_finetune.models import get_family
from ocr_finetune.models.base import write_json
from ocr_finetune.params import LoraParams, validate_params
from ocr_finetune.loading import RUN_INFO


def trained_adapter(family_name, path, folder, mode, legacy=False):
    """An adapter as `train` leaves it: weights (B no longer zero) and the run info naming its base.
    legacy: saved as before save_adapter (PEFT's save_pretrained, in-memory names)."""
    family = get_family(family_name)
    torch.manual_seed(0)
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family,
                                    LoraParams(mode=mode, r=4, alpha=8))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder) if legacy else save_adapter(model, folder)
    write_json(folder / RUN_INFO, {"family": family_name, "base": "tiny", "resolution": "gundam"})
    return folder


def inputs(family, path):
    processor = family.load_processor(path, "gundam")
    im = Image.new("RGB", (900, 1300), "white")
    ImageDraw.Draw(im).rectangle([40, 40, 600, 500], fill="black")
    ex = family.encode_example(processor, im, "<image>\nFree OCR.", "# Title", 16)
    return {"input_ids": ex.input_ids[None], "attention_mask": torch.ones_like(ex.input_ids)[None],
            **family.collate_pixels([ex.pixel])}


@pytest.mark.parametrize("family_name,fixture", [("deepseek-ocr2", "tiny_dir"), ("deepseek-ocr", "tiny_v1_dir")])
def test_merged_export_keeps_the_original_names_and_the_adapter(request, tmp_path, models_cache, family_name,
                                                                 fixture):
    path = request.getfixturevalue(fixture)
    family = get_family(family_name)
    adapter = trained_adapter(family_name, path, tmp_path / "adapter", "both")
    # load_in_4bit as a QLoRA run's params say: the export still merges into the full-precision base
    params = validate_params({"model": {"family": family_name, "cache_dir": str(models_cache),
                                        "resolution": "gundam", "load_in_4bit": True}})
    out = export_merged(params, adapter, tmp_path / "merged", dtype=torch.float32)

    assert checkpoint_keys(out) == checkpoint_keys(path)  # every tensor under its original name and shape
    batch = inputs(family, path)
    with torch.no_grad():
        expected = load_adapter(family.load_model(path, torch.float32, "cpu"), adapter)(**batch).logits
        merged = family.load_model(out, torch.float32, "cpu")(**batch).logits
        base = family.load_model(path, torch.float32, "cpu")(**batch).logits
    assert torch.allclose(merged, expected, rtol=0, atol=1e-4), (merged - expected).abs().max()
    assert not torch.allclose(merged, base, atol=1e-3)
    assert json.loads((out / RUN_INFO).read_text())["exported_as"] == "merged"


@pytest.mark.parametrize("family_name,fixture", [("deepseek-ocr2", "tiny_dir"), ("deepseek-ocr", "tiny_v1_dir")])
def test_vllm_lora_export_maps_every_tensor_to_an_original_weight(request, tmp_path, family_name, fixture):
    path = request.getfixturevalue(fixture)
    adapter = trained_adapter(family_name, path, tmp_path / "adapter", "llm")
    out = export_vllm_lora(adapter, tmp_path / "vllm")
    weights = load_file(out / "adapter_model.safetensors")
    original = checkpoint_keys(path)
    assert weights
    for key, tensor in weights.items():
        assert key.startswith("base_model.model.model.layers."), key
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        out_features, in_features = original[f"{module}.weight"]
        if ".lora_A." in key:
            assert tensor.shape[1] == in_features, key
        else:
            assert tensor.shape[0] == out_features, key
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}


@pytest.mark.parametrize("family_name,fixture", [("deepseek-ocr2", "tiny_dir"), ("deepseek-ocr", "tiny_v1_dir")])
def test_an_adapter_loads_with_plain_peft_as_with_ours(request, tmp_path, family_name, fixture):
    """Users' own scripts load adapters with `PeftModel.from_pretrained`: every tensor must land there (PEFT
    only warns about the ones it cannot place). Adapters saved before save_adapter still load with ours."""
    path = request.getfixturevalue(fixture)
    family = get_family(family_name)
    adapter = trained_adapter(family_name, path, tmp_path / "adapter", "both")
    ours = {k: v for k, v in load_adapter(family.load_model(path, torch.float32, "cpu"), adapter,
                                          compute="float32").state_dict().items() if ".lora_" in k}
    plain = PeftModel.from_pretrained(family.load_model(path, torch.float32, "cpu"), adapter).state_dict()
    assert ours and all(torch.equal(v, plain[k]) for k, v in ours.items())
    assert any(".language_model." in k for k in ours) and any(".vision_tower." in k or "sam" in k for k in ours)
    legacy = trained_adapter(family_name, path, tmp_path / "legacy", "both", legacy=True)
    again = load_adapter(family.load_model(path, torch.float32, "cpu"), legacy, compute="float32").state_dict()
    assert all(torch.equal(v, again[k]) for k, v in ours.items())


def test_vllm_lora_export_refuses_a_vision_adapter(tmp_path, tiny_dir):
    adapter = trained_adapter("deepseek-ocr2", tiny_dir, tmp_path / "adapter", "vision")
    with pytest.raises(ValueError, match="language model's linear layers only.*merged"):
        export_vllm_lora(adapter, tmp_path / "vllm")


def test_export_command(tmp_path, tiny_dir, models_cache):
    import subprocess
    import sys

    from conftest import ROOT

    adapter = trained_adapter("deepseek-ocr2", tiny_dir, tmp_path / "adapter", "llm")
    for fmt in ("merged", "vllm-lora"):
        r = subprocess.run([sys.executable, str(ROOT / "main.py"), "export", "--params", str(ROOT / "params.yaml"),
                            "-S", f"model.cache_dir={models_cache}", "--adapter", str(adapter),
                            "--output", str(tmp_path / fmt), "--format", fmt], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert f"as {fmt}" in r.stdout and (tmp_path / fmt / "adapter_config.json" if fmt == "vllm-lora"
                                             else tmp_path / fmt / "config.json").is_file()


def test_a_missing_or_damaged_adapter_is_named_in_one_line(tmp_path, tiny_dir):
    """`export --format vllm-lora` of a folder without an adapter said only 'No such file ...'; a damaged
    weight file was a SafetensorError traceback."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no adapter in .*run `train` first"):
        export_vllm_lora(tmp_path / "empty", tmp_path / "out")
    adapter = trained_adapter("deepseek-ocr2", tiny_dir, tmp_path / "adapter", "llm")
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    with pytest.raises(ValueError, match="cannot be read"):
        export_vllm_lora(adapter, tmp_path / "out")
