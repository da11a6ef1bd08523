import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from ocr_finetune.params import ParamsError, load_params, validate_params


def error_for(raw):
    with pytest.raises(ParamsError) as e:
        validate_params(raw)
    return str(e.value)


def test_shipped_params_are_valid_and_offline():
    p = load_params(ROOT / "params.yaml")
    assert p.model.base == "tiny" and p.teacher.kind == "pdf_text"


def test_bad_value_names_key_and_allowed_values():
    msg = error_for({"lora": {"mode": "foo"}})
    assert "lora.mode" in msg and "vision, llm, both" in msg and "'foo'" in msg


def test_unknown_key_names_key_and_known_keys():
    msg = error_for({"train": {"learning_rat": 0.1}})
    assert "unknown key `train.learning_rat`" in msg and "learning_rate" in msg
    assert "unknown key `bogus`" in error_for({"bogus": {}})


def test_wrong_type_and_range():
    assert "train.batch_size" in error_for({"train": {"batch_size": "two"}})
    assert "pdf2img.dpi" in error_for({"pdf2img": {"dpi": 5}})
    assert "pdf2img.format" in error_for({"pdf2img": {"format": "tiff"}}) and "png, jpg" in error_for(
        {"pdf2img": {"format": "tiff"}})
    assert "end_page" in error_for({"pdf2img": {"start_page": 3, "end_page": 2}})


def test_credentials_never_go_in_params():
    """Params are logged to MLflow and committed in dvc.lock: no user:password, no key in a query string, and
    the error does not repeat the secret."""
    for section, key, url in (("tracking", "tracking_uri", "https://user:secret@mlflow.example"),
                              ("tracking", "tracking_uri", "https://mlflow.example/?access_token=secret"),
                              ("teacher", "api", "https://alice:secret@llm.example/v1"),
                              ("teacher", "api", "https://x.openai.azure.com/openai?api-key=secret")):
        raw = {section: {key: url} if key != "api" else {"api": {"base_url": url}}}
        message = error_for(raw)
        assert "environment" in message and "secret" not in message, url
    validate_params({"teacher": {"api": {"base_url": "https://llm.example/v1?monkey=1"}},
                     "tracking": {"tracking_uri": "databricks"}})
    validate_params({"tracking": {"tracking_uri": "postgresql://mlflow@db/mlflow"}})  # password from .pgpass


def test_tracking_stores_and_output_folders_that_cannot_work_are_refused():
    assert "sqlite:///" in error_for({"tracking": {"tracking_uri": "mlruns"}})
    assert "sqlite:///" in error_for({"tracking": {"tracking_uri": "file:///tmp/mlruns"}})
    assert "not the project folder" in error_for({"train": {"output_dir": "."}})
    for ckpt in ("models/x/", "models/x/checkpoints"):  # dvc repro deletes the adapter folder before training
        assert "inside it" in error_for({"train": {"output_dir": "models/x", "checkpoint_dir": ckpt}})


def test_stage_stops_before_any_work(tmp_path):
    """A stage run with a bad params.yaml exits with the message and writes nothing."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["lora"]["mode"] = "foo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    r = subprocess.run([sys.executable, "stages/pdf2img.py"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0
    assert "lora.mode" in r.stderr and "vision, llm, both" in r.stderr
    assert not (tmp_path / "data").exists()


def test_stage_reports_a_users_mistake_in_one_line(tmp_path):
    """A stage's ModelLoadError (a model.base folder that is not there) is one line as in the CLI, not a
    traceback; the stage still fails."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["model"]["base"] = str(tmp_path / "no-such-model")
    raw["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    # a dataset to train on: train() reads it before the (slow) model load, so a missing one is found first
    from PIL import Image

    from ocr_finetune.dataset import make_record

    dataset = tmp_path / raw["data"]["dataset_dir"]
    dataset.mkdir(parents=True)
    Image.new("RGB", (40, 60), "white").save(dataset / "a_p1.png")
    (dataset / "train.jsonl").write_text(json.dumps(make_record("a_p1.png", "<image>\nFree OCR.", "t", "a", 1)) + "\n")
    r = subprocess.run([sys.executable, str(ROOT / "stages" / "train.py")], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "no such checkpoint folder" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resolution_must_be_a_preset_of_the_family():
    msg = error_for({"model": {"family": "deepseek-ocr", "resolution": "nocrop"}})
    assert "model" in msg and "tiny, small, base, large, gundam" in msg
    assert "nocrop, gundam" in error_for({"model": {"resolution": "large"}})
    assert "mode llm or both" in error_for({"lora": {"mode": "vision", "experts": True}})


def test_compile_auto_resolves_by_device_and_setup():
    """train.compile auto: every layer on CUDA, but not the language model where it would recompile every
    step (LoRA on the routed experts) or is unmeasured (4-bit), and not the vision towers where they run
    once per page (mode llm, cached features); nothing on CPU; an explicit choice is kept."""
    from ocr_finetune.train import compile_scope

    def scope(device, **sections):
        return compile_scope(validate_params(sections), device)

    assert scope("cpu") == "none" and scope("cuda") == scope("cuda:1") == "all"
    assert scope("cuda", lora={"mode": "both", "experts": True}) == "vision"
    assert scope("cuda", model={"load_in_4bit": True}) == "vision"
    # mode llm: the towers run once per page with cached features, so only the language model compiles
    assert scope("cuda", lora={"mode": "llm"}) == "llm"
    assert scope("cuda", lora={"mode": "llm"}, train={"cache_vision_features": False}) == "all"
    assert scope("cuda", lora={"mode": "llm", "experts": True}) == "none"
    # ... and not for a short run, where compiling costs more time than it saves
    from ocr_finetune.train import LLM_COMPILE_MIN_PAGES

    llm = validate_params({"lora": {"mode": "llm"}})
    assert compile_scope(llm, "cuda", LLM_COMPILE_MIN_PAGES - 1) == "none"
    assert compile_scope(llm, "cuda", LLM_COMPILE_MIN_PAGES) == "llm"
    assert compile_scope(validate_params({}), "cuda", 100) == "all"  # mode both: the towers run every step
    assert scope("cpu", train={"compile": "all"}) == "all"
    assert scope("cuda", train={"compile": "none"}) == "none"


def test_remote_code_switch_is_refused_with_the_reason():
    with pytest.raises(ParamsError, match=r"unknown key `model.trust_remote_code`: not offered: .*transformers 4.46"):
        validate_params({"model": {"trust_remote_code": True}})


def test_output_folders_never_hold_the_users_pdfs():
    """pdf2img empties data.pages_dir (and dvc repro deletes outputs): pointed at the PDFs' folder, it deleted
    them."""
    for data in ({"pdf_dir": "docs", "pages_dir": "docs"}, {"pdf_dir": "data/x/pdfs", "pages_dir": "data/x"},
                 {"pdf_dir": "in", "labels_dir": "in"}, {"truth_dir": "t", "dataset_dir": "t"}):
        with pytest.raises(ParamsError, match=r"data\.\w+_dir .* holds data\.\w+_dir"):
            validate_params({"data": data})
    validate_params({"data": {"pdf_dir": "data/x", "pages_dir": "data/x/pages"}})


def test_the_ray_engine_without_ray_installed_says_how_to_get_it(tmp_path):
    """`runtime.engine: ray` where Ray is not installed: one line naming the extra, not an import traceback."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['ray'] = None\n"  # as if not installed
            "from ocr_finetune.engines import transcriber\n"
            "from ocr_finetune.params import validate_params\n"
            "try:\n    transcriber(validate_params({'runtime': {'engine': 'ray'}}))\n"
            "except ValueError as e:\n    print('ERROR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "ERROR runtime.engine ray needs ray, which is not installed: pip install 'ocr-finetune[ray]'" in r.stdout, r.stderr
