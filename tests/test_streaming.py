"""The data path streams: features of frozen towers are kept on disk and never stale, and host memory does not
grow with the corpus (training and inference over 40 and over 400 gundam-sized pages)."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from conftest import ROOT

from ocr_finetune.dataset import make_record
from ocr_finetune.params import validate_params


def write_pages(folder, n, size=(620, 877), label_words=6):
    """n distinct pages (each its own bars and number) and train.jsonl over them. A4-shaped: in gundam mode
    each is a 1024px view and 6 tiles of 768px, 1121 image tokens, as a full page."""
    (folder / "pages").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        im = Image.new("RGB", size, "white")
        draw = ImageDraw.Draw(im)
        for k in range(1 + i % 7):
            y = 40 + 90 * k + (i * 13) % 60
            draw.rectangle([30 + (i * 7) % 200, y, size[0] - 30, y + 30], fill="black")
        draw.text((40, size[1] - 60), f"page {i}", fill="black")
        name = f"doc{i:04d}_p1.png"
        im.save(folder / "pages" / name)
        rows.append(make_record(f"pages/{name}", "<image>\nFree OCR.", " ".join(f"w{i % 97}" for _ in range(label_words)),
                                f"doc{i:04d}", 1))
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl"


def llm_params(tmp_path, models_cache, name, resolution="nocrop", **train):
    return validate_params({
        "model": {"cache_dir": str(models_cache), "resolution": resolution},
        "lora": {"mode": "llm", "r": train.pop("r", 8)},
        "train": {"device": "cpu", "batch_size": 2, "epochs": 1, "max_label_tokens": 32, "learning_rate": 1e-3,
                  "save_every": 0, "output_dir": str(tmp_path / name / "adapter"),
                  "checkpoint_dir": str(tmp_path / name / "ckpt"),
                  "feature_cache_dir": str(tmp_path / "features"), **train},
        "tracking": {"enabled": False}})


def test_vision_features_are_kept_on_disk_reused_and_never_stale(tmp_path, models_cache):
    from ocr_finetune.train import train

    data = write_pages(tmp_path / "ds", 6, size=(200, 280))
    cache = tmp_path / "features"

    first = train(llm_params(tmp_path, models_cache, "a", epochs=2), data, progress=False)
    assert first.features_computed >= 6 and first.features_computed + first.features_read == 12
    assert len(list(cache.glob("*/*.safetensors"))) == 6  # one entry per page, whatever the epochs

    # a new experiment on the same pages (another LoRA rank): every page's features come from disk
    second = train(llm_params(tmp_path, models_cache, "b", r=4), data, progress=False)
    assert (second.features_computed, second.features_read) == (0, 6)
    # ... and train what the towers computed in the step: the same run without the cache
    plain = train(llm_params(tmp_path, models_cache, "c", r=4, cache_vision_features=False), data, progress=False)
    assert second.losses == pytest.approx(plain.losses, rel=1e-5)

    # one page drawn anew under the same name: recomputed, the other five read
    page = tmp_path / "ds" / "pages" / "doc0003_p1.png"
    im = Image.open(page).convert("RGB")
    ImageDraw.Draw(im).rectangle([0, 0, 199, 100], fill="black")
    im.save(page)
    third = train(llm_params(tmp_path, models_cache, "d", r=4), data, progress=False)
    assert (third.features_computed, third.features_read) == (1, 5)
    assert len(list(cache.glob("*/*.safetensors"))) == 7
    fresh = train(llm_params(tmp_path, models_cache, "e", r=4, cache_vision_features=False), data, progress=False)
    assert third.losses == pytest.approx(fresh.losses, rel=1e-5)


def test_feature_cache_keeps_to_its_size(tmp_path, models_cache):
    from ocr_finetune.train import train

    data = write_pages(tmp_path / "ds", 6, size=(200, 280))
    train(llm_params(tmp_path, models_cache, "a"), data, progress=False)
    entries = list((tmp_path / "features").glob("*/*.safetensors"))
    one = entries[0].stat().st_size
    limit = 3.5 * one / 2**30  # room for three entries and a half
    second = train(llm_params(tmp_path, models_cache, "b", feature_cache_gib=limit, r=4), data, progress=False)
    assert second.features_read > 0 and second.features_computed > 0  # trimmed at the start, refilled
    total = sum(p.stat().st_size for p in (tmp_path / "features").glob("*/*.safetensors"))
    assert 0 < total <= 3.5 * one


def test_a_page_s_cached_features_do_not_depend_on_the_batch_it_was_first_met_in(tmp_path, models_cache,
                                                                                    monkeypatch):
    """The cache keeps a page's features for every later run, so they must be the page's alone: computed with
    the page by itself, not with whichever pages shared its first batch. On a GPU the kernels (and so the last
    bits) depend on the batch size; here the vision towers are made to do the same. Pages with and without
    tiles (gundam) in one batch."""
    from transformers import DeepseekOcr2Model

    from ocr_finetune.train import train

    tower = DeepseekOcr2Model.get_image_features

    def batch_dependent(self, pixel_values, *args, **kwargs):
        out = tower(self, pixel_values, *args, **kwargs)
        out["pooler_output"] = [f * (1 + 2**-20 * (len(pixel_values) - 1)) for f in out["pooler_output"]]
        return out

    monkeypatch.setattr(DeepseekOcr2Model, "get_image_features", batch_dependent)
    data = write_pages(tmp_path / "ds", 5)
    for i in (1, 3):  # small pages: no tiles
        page = tmp_path / "ds" / "pages" / f"doc{i:04d}_p1.png"
        Image.open(page).resize((200, 280)).save(page)

    entries = {}
    for batch_size in (1, 5):
        folder = tmp_path / f"features_b{batch_size}"
        result = train(llm_params(tmp_path, models_cache, f"b{batch_size}", resolution="gundam",
                                  batch_size=batch_size, feature_cache_dir=str(folder)), data, progress=False)
        assert result.features_computed == 5
        entries[batch_size] = {p.name: load_file(p) for p in folder.glob("*/*.safetensors")}
    assert len(entries[1]) == 5 and entries[1].keys() == entries[5].keys()
    assert len({e["features"].shape for e in entries[1].values()}) == 2  # pages with tiles and without
    for name, alone in entries[1].items():
        together = entries[5][name]
        assert torch.equal(alone["features"], together["features"]), name
        assert torch.equal(alone["image_tokens"], together["image_tokens"])


def test_a_feature_entry_is_found_by_text_alone(tiny_dir, tiny_v1_dir):
    """A page read from the cache is tokenised without its image (encode_text): the same ids and labels as
    the processor gives with the image, for both families and any tiling."""
    from ocr_finetune.models import get_family

    for name, path in (("deepseek-ocr2", tiny_dir), ("deepseek-ocr", tiny_v1_dir)):
        family = get_family(name)
        processor = family.load_processor(path, "gundam")
        for size in ((300, 300), (620, 877), (1400, 500)):
            with_image = family.encode_example(processor, Image.new("RGB", size, "white"), "<image>\nFree OCR.",
                                               "# Title\n\nbody", 16)
            text_only = family.encode_text(processor, "<image>\nFree OCR.", "# Title\n\nbody",
                                           with_image.image_tokens, 16)
            assert torch.equal(with_image.input_ids, text_only.input_ids), (name, size)
            assert torch.equal(with_image.labels, text_only.labels)


PEAK_RSS = """
import resource, sys
from ocr_finetune.cli import main
code = main(sys.argv[1:])
gib = lambda who: resource.getrusage(who).ru_maxrss / 2**20
print(f"PEAK {gib(resource.RUSAGE_SELF):.3f} {gib(resource.RUSAGE_CHILDREN):.3f}")
sys.exit(code)
"""


def peak_rss_gib(*args) -> float:
    """Peak RSS of a CLI command's process plus the largest of its workers, in GiB."""
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    main, workers = map(float, r.stdout.rsplit("PEAK ", 1)[1].split())
    return main + workers


def test_host_memory_is_flat_in_the_corpus_size(tmp_path, tiny_v1_dir):
    """One epoch of training (LoRA llm, features computed and stored as pages come) and infer, each over 40
    and over 400 A4-shaped pages: peak host RSS differs by less than 1 GiB. Read by DeepSeek-OCR (v1; the data path
    is the families' shared one) in its `tiny` view (one 512px view a page) to keep the suite's time: gundam's seven views cost the tiny model's vision tower
    ~1 s a page on this CPU, 15 minutes for the four runs. Every page's pixels kept, as before, would still
    cost 3 MiB a page here (float32), 1.2 GiB more for 400 pages (the decoded page images
    another 0.6 GiB); at gundam size on the GPU the host grew 2.7 GiB over 2,000 pages
    (benchmarks/results/streaming_h200.json)."""
    import yaml

    peaks = {}
    for n in (40, 400):
        folder = tmp_path / str(n)
        data = write_pages(folder, n, label_words=3)
        params = folder / "params.yaml"
        params.write_text(yaml.safe_dump({
            "model": {"family": "deepseek-ocr", "base": str(tiny_v1_dir), "resolution": "tiny"},
            "lora": {"mode": "llm", "r": 4},
            "train": {"device": "cpu", "batch_size": 8, "epochs": 1, "max_label_tokens": 16,
                      "save_every": 0, "output_dir": str(folder / "adapter"), "checkpoint_dir": str(folder / "ckpt"),
                      "feature_cache_dir": str(folder / "features")},
            "evaluate": {"static_cache": "off"},
            "teacher": {"kind": "local", "cache_dir": str(folder / "answers")},
            "tracking": {"enabled": False}}))
        train_peak = peak_rss_gib("train", "--params", params, "--dataset", data)
        infer_peak = peak_rss_gib("infer", "--params", params, "--images", folder / "pages", "--output",
                                  folder / "out", "--max-new-tokens", 2, "--batch-size", 8)
        assert len(list((folder / "out").glob("*.md"))) == n
        peaks[n] = (train_peak, infer_peak)
    print("peak RSS GiB (train, infer):", peaks)
    assert abs(peaks[400][0] - peaks[40][0]) < 1.0, peaks
    assert abs(peaks[400][1] - peaks[40][1]) < 1.0, peaks
