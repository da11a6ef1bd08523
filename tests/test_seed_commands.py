"""The seed README's commands and config files, as its users copy them (issue 17)."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from pathlib import Path

from conftest import ROOT
from ocr_finetune.params import ParamsError, Params
from ocr_finetune.seed_config import load_train_config

SAMPLES = ROOT / "data" / "samples" / "pdfs"


def main_py(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_the_example_train_config_maps_onto_params(tmp_path):
    params = load_train_config(ROOT / "config" / "examples" / "train_config.example.yaml", Params())
    raw = yaml.safe_load((ROOT / "config" / "examples" / "train_config.example.yaml").read_text())
    assert params.model.family == "deepseek-ocr" and params.model.base == raw["model"]["base_model_path"]
    assert params.model.resolution == "gundam"  # image_size 640, base_size 1024, crop_mode true
    assert params.lora.r == raw["lora"]["r"] and params.lora.alpha == raw["lora"]["lora_alpha"]
    assert params.train.batch_size == raw["training"]["per_device_train_batch_size"]
    assert params.train.grad_accum == raw["training"]["gradient_accumulation_steps"]
    assert params.train.max_steps == raw["training"]["max_steps"]
    assert params.train.save_every == raw["training"]["save_steps"]
    assert params.train.log_every == raw["training"]["logging_steps"]


@pytest.mark.parametrize("change,message", [
    ({"image": {"image_size": 700, "base_size": 1024, "crop_mode": True}},
     "is not a preset of deepseek-ocr (allowed presets: Tiny: image_size 512"),
    ({"training": {"learning_rate": -1}}, "`training.learning_rate`"),
    ({"lora": {"rank": 8}}, "unknown key(s) lora.rank"),
])
def test_a_mistake_in_the_train_config_names_the_key_as_written(tmp_path, change, message):
    raw = yaml.safe_load((ROOT / "config" / "examples" / "train_config.example.yaml").read_text())
    for section, values in change.items():
        raw[section] = {**raw.get(section, {}), **values}
    path = tmp_path / "train_config.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        load_train_config(path, Params())
    assert message in str(e.value)


def test_pdf2img_as_the_seed_readme_writes_it(tmp_path):
    """`python main.py pdf2img --source document.pdf --output ./images --dpi 300`, and without --output
    (default ./output_images), from a folder with no params.yaml."""
    shutil.copy(SAMPLES / "korean_memo.pdf", tmp_path / "document.pdf")
    r = main_py("pdf2img", "--source", "document.pdf", "--output", "./images", "--dpi", 40, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "images" / "document_p1.png").is_file()
    r = main_py("pdf2img", "--source", "document.pdf", "--dpi", 40, "--format", "jpg", "--start-page", 1,
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "output_images" / "document_p1.jpg").is_file()


def test_train_mode_and_config_are_the_seed_spellings(tmp_path, tiny_v1_dir, sample_dataset):
    """`python main.py train --dataset data.jsonl --mode llm` from a folder without params.yaml, reading the
    seed-shaped config/train_config.yaml: mode, rank, steps, preset and module names reach the adapter."""
    import json

    (tmp_path / "config").mkdir()
    raw = yaml.safe_load((ROOT / "config" / "examples" / "train_config.example.yaml").read_text())
    raw["model"]["base_model_path"] = str(tiny_v1_dir)  # a tiny DeepSeek-OCR built offline
    raw["lora"].update(r=4, llm_target_modules=["q_proj", "v_proj"])
    raw["training"].update(max_steps=2, save_steps=0, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1)
    raw["image"] = {"image_size": 512, "base_size": 512, "crop_mode": False}  # Tiny
    (tmp_path / "config" / "train_config.yaml").write_text(yaml.safe_dump(raw))
    r = main_py("train", "--dataset", sample_dataset, "--mode", "llm", "--output", "adapter",
                "-S", "train.device=cpu", "-S", "tracking.enabled=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.loads((tmp_path / "adapter" / "ocr_finetune.json").read_text())
    text = json.dumps(record)
    assert '"llm"' in text and '"tiny"' in text, text[:2000]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4
    from safetensors.torch import load_file

    names = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert names and all(".q_proj." in n or ".v_proj." in n for n in names), sorted(names)[:6]
    # the language model only (saved under the original checkpoint's names: `model.layers.N...`)
    assert all(n.startswith("base_model.model.model.layers.") for n in names), sorted(names)[:6]


def commands(markdown: str) -> list[str]:
    """The command lines in a README's code blocks (comments after `#` dropped, spacing normalised)."""
    import re

    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", markdown, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if re.match(r"(ocr-finetune|python main\.py|dvc|make)\b", line):
                found.append(" ".join(line.split()))
    return found


def test_the_korean_readme_lists_the_english_readmes_commands():
    english = commands((ROOT / "README.md").read_text(encoding="utf-8"))
    korean = commands((ROOT / "README.ko.md").read_text(encoding="utf-8"))
    assert len(english) > 15
    assert sorted(set(english)) == sorted(set(korean))


def test_infer_with_a_seed_teacher_config_against_a_real_server(tmp_path):
    """`python main.py infer --pdf document.pdf --config config/teacher_api.yaml --task document` with the
    seed-shaped config: its model, limits and key variable reach the server, `output.format` is the default
    format, `output.save_images: false` leaves no page images, and `--output` defaults to ./output."""
    from openai_server import ScriptedOpenAI

    shutil.copy(SAMPLES / "korean_memo.pdf", tmp_path / "document.pdf")
    raw = yaml.safe_load((ROOT / "config" / "examples" / "teacher_api.example.yaml").read_text())
    (tmp_path / "config").mkdir()
    with ScriptedOpenAI() as server:
        raw["api"].update(base_url=server.base_url, api_key="${SEED_TEST_KEY}", model_name="acme/ocr")
        raw["generation"]["max_tokens"] = 321
        raw["output"] = {"format": "json", "save_images": False}
        (tmp_path / "config" / "teacher_api.yaml").write_text(yaml.safe_dump(raw))
        env = {**__import__("os").environ, "SEED_TEST_KEY": "sk-" + "s" * 20}
        r = subprocess.run([sys.executable, str(ROOT / "main.py"), "infer", "--pdf", "document.pdf", "--config",
                            "config/teacher_api.yaml", "--task", "document", "--dpi", "40", "-S",
                            "teacher.cache_dir=cache"], cwd=tmp_path, capture_output=True, text=True, env=env,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert server.auth == {"Bearer sk-" + "s" * 20}
        assert {b["model"] for b in server.bodies} == {"acme/ocr"}
        assert {b.get("max_tokens") for b in server.bodies} == {321}
    doc = json.loads((tmp_path / "output" / "document.json").read_text())
    assert doc["pages"] and all(p["status"] == "labeled" for p in doc["pages"]), doc
    assert not (tmp_path / "output" / "pages").exists()

    listed = main_py("infer", "--config", "config/teacher_api.yaml", "--list-prompts", cwd=tmp_path)
    assert listed.returncode == 0 and "free_ocr" in listed.stdout and "document" in listed.stdout


def test_a_key_written_into_the_seed_teacher_config_is_refused(tmp_path):
    from ocr_finetune.seed_config import load_teacher_config

    raw = yaml.safe_load((ROOT / "config" / "examples" / "teacher_api.example.yaml").read_text())
    raw["api"]["api_key"] = "sk-" + "z" * 24
    path = tmp_path / "teacher_api.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ParamsError) as e:
        load_teacher_config(path, Params())
    assert "`api.api_key` holds a key" in str(e.value) and "${OPENAI_API_KEY}" in str(e.value)
    assert "zzzz" not in str(e.value)
    raw["api"]["api_key"] = "${MY_KEY}"
    path.write_text(yaml.safe_dump(raw))
    params, output = load_teacher_config(path, Params())
    assert params.teacher.api.api_key_env == "MY_KEY" and params.teacher.kind == "api"
    assert output == raw["output"] and params.teacher.prompts["free_ocr"]["user"].endswith("Free OCR.")


def test_the_seed_model_path_is_filled_from_unsloth_on_first_use(tmp_path, tiny_v1_dir, monkeypatch):
    """`base_model_path: models/deepseek_ocr` (the seed's default): downloaded from unsloth/DeepSeek-OCR into
    that folder when it is not there, used as it is once it is."""
    from ocr_finetune.models.base import ModelLoadError, resolve_checkpoint

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as e:
        resolve_checkpoint("models/deepseek_ocr", tmp_path / "cache", False, "about 6.7 GB")
    assert "hf download unsloth/DeepSeek-OCR --local-dir models/deepseek_ocr" in str(e.value)
    with pytest.raises(ModelLoadError, match="could not download unsloth/DeepSeek-OCR"):  # offline here
        resolve_checkpoint("./models/deepseek_ocr", tmp_path / "cache", True, "about 6.7 GB")
    shutil.copytree(tiny_v1_dir, tmp_path / "models" / "deepseek_ocr")
    assert resolve_checkpoint("models/deepseek_ocr", tmp_path / "cache", False, "") == Path("models/deepseek_ocr")


def test_the_original_deepseek_ocr2_repository_layout_says_which_checkpoint_to_use(tmp_path, tiny_dir):
    from ocr_finetune.models import get_family
    from ocr_finetune.models.base import ModelLoadError

    original = tmp_path / "DeepSeek-OCR-2"
    shutil.copytree(tiny_dir, original)
    config = json.loads((original / "config.json").read_text())
    config.update(model_type="deepseek_vl_v2", auto_map={"AutoModel": "modeling_deepseekocr2.DeepseekOCR2ForCausalLM"})
    (original / "config.json").write_text(json.dumps(config))
    (original / "preprocessor_config.json").unlink(missing_ok=True)
    family = get_family("deepseek-ocr2")
    for load in (lambda: family.load_processor(original, "gundam"),
                 lambda: family.load_model(original, __import__("torch").float32, "cpu")):
        with pytest.raises(ModelLoadError, match="model.base=deepseek-community/DeepSeek-OCR-2"):
            load()


def test_a_tokenizer_config_with_remote_code_loads_without_a_prompt(tmp_path, tiny_v1_dir):
    """deepseek-ai/DeepSeek-OCR's tokenizer_config.json names remote code (auto_map): loading must not stop
    at transformers' "Do you wish to run the custom code?" prompt (stdin here is a pipe that stays open)."""
    checkpoint = tmp_path / "v1"
    shutil.copytree(tiny_v1_dir, checkpoint)
    cfg = json.loads((checkpoint / "tokenizer_config.json").read_text())
    cfg.pop("tokenizer_class", None)  # as there: the class is the remote code's
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_deepseek.DeepseekTokenizer", None]}
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(cfg))
    code = ("from ocr_finetune.models import get_family; "
            f"p = get_family('deepseek-ocr').load_processor({str(checkpoint)!r}, 'base'); print(type(p).__name__)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=120)  # stdin left open and silent: a prompt would wait here
    assert proc.returncode == 0, err[-2000:]
    assert "Processor" in out


def test_train_defaults_are_the_seeds_without_a_params_file(tmp_path, monkeypatch):
    """The seed README: `train` defaults to `--mode vision` and `--output ./models/finetuned`. They hold where
    the seed's world is (no params.yaml, or a seed train config); a params.yaml keeps its own; flags win."""
    from ocr_finetune.cli import _params, build_parser

    def params(*argv):
        args = build_parser().parse_args(["train", *argv])
        return _params(args)

    monkeypatch.chdir(tmp_path)
    bare = params("--dataset", "data.jsonl")
    assert (bare.lora.mode, bare.train.output_dir) == ("vision", "models/finetuned")
    flagged = params("--dataset", "data.jsonl", "--mode", "both", "--set", "train.output_dir=out")
    assert (flagged.lora.mode, flagged.train.output_dir) == ("both", "out")
    (tmp_path / "params.yaml").write_text("lora:\n  mode: llm\ntrain:\n  output_dir: models/mine\n")
    own = params("--dataset", "data.jsonl")
    assert (own.lora.mode, own.train.output_dir) == ("llm", "models/mine")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "train_config.yaml").write_text("lora:\n  r: 8\n")
    seeded = params("--dataset", "data.jsonl")
    assert (seeded.lora.mode, seeded.lora.r, seeded.train.output_dir) == ("vision", 8, "models/finetuned")


def test_the_seed_local_teacher_example_maps_onto_params():
    """config/examples/teacher_local.example.yaml in the seed's shape: a local teacher of the named family,
    with the official limit and the file's prompts."""
    from ocr_finetune.seed_config import load_teacher_config

    params, output = load_teacher_config(ROOT / "config" / "examples" / "teacher_local.example.yaml",
                                         Params(model={"family": "deepseek-ocr", "resolution": "tiny"}))
    assert (params.teacher.kind, params.model.family, params.model.resolution) == ("local", "deepseek-ocr2", "gundam")
    assert params.teacher.local.max_new_tokens == 8192 and output["format"] == "md"
    assert params.teacher.prompts["document"]["user"] == "<image>\n<|grounding|>Convert the document to markdown."
