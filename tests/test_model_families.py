"""Both model families on tiny configs: presets and their token counts, LoRA targets per mode (experts
included), exact adapter round trips, mixed page sizes at batch > 1, and v1's original weight layout."""

import functools
import json
import re

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from ocr_finetune.lora import attach_lora_from_params, load_adapter, lora_modules, trainable_parameters
from ocr_finetune.models import FAMILIES, get_family
from ocr_finetune.params import RESOLUTIONS, LoraParams
from ocr_finetune.data import pad_batch
from ocr_finetune.train import batch_loss

PROMPT = "<image>\nFree OCR."


@pytest.fixture
def checkpoints(tiny_dir, tiny_v1_dir):
    return {"deepseek-ocr2": tiny_dir, "deepseek-ocr": tiny_v1_dir}


def page(size=(300, 400), box=None):
    im = Image.new("RGB", size, "white")
    ImageDraw.Draw(im).rectangle(box or [20, 20, size[0] - 20, size[1] // 2], fill="black")
    return im


def image_tokens(processor, ex) -> int:
    return int((ex.input_ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())


def perturb_lora(model, std: float) -> None:
    """LoRA B starts at zero, which makes every adapter a no-op: give it random values so that the adapters
    change outputs and gradients reach A."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, std)


def test_params_presets_match_the_family_modules():
    """The registry's preset names (what params accept) are each family module's presets, and params accept
    exactly the registered families."""
    import typing

    from ocr_finetune.params import ModelParams

    assert set(RESOLUTIONS) == set(FAMILIES)
    assert set(typing.get_args(ModelParams.model_fields["family"].annotation)) == set(FAMILIES)
    for name in FAMILIES:
        assert get_family(name).NAME == name
        assert tuple(get_family(name).RESOLUTIONS) == RESOLUTIONS[name]


# v1's published modes: vision tokens q*q (64/100/256/400); the processor adds a newline per row and one
# separator, and gundam 10x10 per 640px tile (+ a newline per tile row) beside the 1024 global view.
V1_GLOBAL = {"tiny": 8, "small": 10, "base": 16, "large": 20}


@pytest.mark.parametrize("preset", list(V1_GLOBAL))
def test_v1_single_view_presets_have_the_published_token_counts(tiny_v1_dir, preset):
    family = get_family("deepseek-ocr")
    processor = family.load_processor(tiny_v1_dir, preset)
    ex = family.encode_example(processor, page((1200, 1600)), PROMPT, "x", 8)
    q = V1_GLOBAL[preset]
    assert image_tokens(processor, ex) == q * (q + 1) + 1
    assert ex.pixel["pixel_values"].shape[-1] == q * 64 and ex.pixel["num_local_patches"] == [0]


def test_v1_gundam_tiles_at_most_nine_of_640(tiny_v1_dir):
    family = get_family("deepseek-ocr")
    processor = family.load_processor(tiny_v1_dir, "gundam")
    for size in ((1200, 1600), (900, 4000), (3000, 3000)):
        ex = family.encode_example(processor, page(size), PROMPT, "x", 8)
        (cols, rows), n = ex.pixel["patches_grid"][0], ex.pixel["num_local_patches"][0]
        assert n == cols * rows and 2 <= n <= 9, size
        assert ex.pixel["pixel_values_local"].shape[1:] == (3, 640, 640)
        assert image_tokens(processor, ex) == 16 * 17 + 1 + (rows * 10) * (cols * 10 + 1)


def test_ocr2_presets_token_counts(tiny_dir):
    family = get_family("deepseek-ocr2")
    nocrop = family.load_processor(tiny_dir, "nocrop")
    assert image_tokens(nocrop, family.encode_example(nocrop, page((1200, 1600)), PROMPT, "x", 8)) == 145
    gundam = family.load_processor(tiny_dir, "gundam")
    small = family.encode_example(gundam, page((600, 700)), PROMPT, "x", 8)  # fits one tile: no crops
    assert small.pixel["num_local_patches"] == [0] and image_tokens(gundam, small) == 257
    big = family.encode_example(gundam, page((1240, 1754)), PROMPT, "x", 8)
    assert big.pixel["num_local_patches"] == [6] and image_tokens(gundam, big) == 256 + 144 * 6 + 1


# r=16 on the tiny configs, pinned: a change in targeting shows up here. (modules, trainable parameters)
PINNED = {
    ("deepseek-ocr2", "vision", False): (22, 36_864), ("deepseek-ocr2", "llm", False): (14, 30_208),
    ("deepseek-ocr2", "both", False): (36, 67_072), ("deepseek-ocr2", "llm", True): (16, 44_544),
    ("deepseek-ocr", "vision", False): (20, 38_912), ("deepseek-ocr", "llm", False): (14, 30_208),
    ("deepseek-ocr", "both", False): (34, 69_120), ("deepseek-ocr", "both", True): (36, 83_456),
}


@pytest.mark.parametrize("family_name,mode,experts", list(PINNED))
def test_lora_targets_are_scoped_to_their_tower(checkpoints, family_name, mode, experts):
    family = get_family(family_name)
    model = family.load_model(checkpoints[family_name], torch.float32, "cpu")
    peft_model = attach_lora_from_params(model, family, LoraParams(mode=mode, experts=experts))
    modules = lora_modules(peft_model)
    assert (len(modules), trainable_parameters(peft_model)) == PINNED[(family_name, mode, experts)]
    in_llm = [m for m in modules if ".language_model." in m]
    in_vision = [m for m in modules if ".vision_tower." in m]
    assert len(in_llm) + len(in_vision) == len(modules)  # never the projector, lm_head or SAM's conv proj
    assert bool(in_llm) == (mode != "vision") and bool(in_vision) == (mode != "llm")
    assert not any(re.search(r"sam_encoder\.proj|multi_modal_projector|lm_head", m) for m in modules)
    assert any("experts" in m and "shared" not in m for m in modules) == experts


@pytest.mark.parametrize("family_name,mode,experts", [
    ("deepseek-ocr2", "vision", False), ("deepseek-ocr2", "llm", False), ("deepseek-ocr2", "both", False),
    ("deepseek-ocr2", "both", True), ("deepseek-ocr", "vision", False), ("deepseek-ocr", "llm", False),
    ("deepseek-ocr", "both", True)])
def test_adapter_round_trips_exactly(checkpoints, tmp_path, family_name, mode, experts):
    """Saved, then reloaded the way evaluate/infer load it: the same logits as the in-memory model (PEFT's own
    from_pretrained drops an `llm` adapter on these models: the logits would equal the base's)."""
    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    ex = family.encode_example(processor, page((900, 1300)), PROMPT, "# Hello world", 32)
    inputs = {"input_ids": ex.input_ids[None], "attention_mask": torch.ones_like(ex.input_ids)[None],
              **family.collate_pixels([ex.pixel])}
    with torch.no_grad():
        base_logits = family.load_model(path, torch.float32, "cpu")(**inputs).logits
    torch.manual_seed(0)
    tuned = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family,
                                    LoraParams(mode=mode, r=8, alpha=16, experts=experts))
    perturb_lora(tuned, 0.5)  # a trained adapter: B is no longer zero
    tuned.eval()
    with torch.no_grad():
        tuned_logits = tuned(**inputs).logits
    assert not torch.allclose(tuned_logits, base_logits, atol=1e-4)
    tuned.save_pretrained(tmp_path / "adapter")
    reloaded = load_adapter(family.load_model(path, torch.float32, "cpu"), tmp_path / "adapter")
    with torch.no_grad():
        reloaded_logits = reloaded(**inputs).logits
    assert torch.allclose(reloaded_logits, tuned_logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_pages_of_different_sizes_train_in_one_batch(checkpoints, family_name):
    """Crop mode gives pages different tile and token counts (what broke batch > 1 elsewhere)."""
    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    pages = [page((600, 700)), page((1240, 1754)), page((2000, 900))]
    items = [family.encode_example(processor, im, PROMPT, text, 32)
             for im, text in zip(pages, ["# A", "| a | b |\n| --- | --- |", "long text " * 5])]
    assert len({image_tokens(processor, x) for x in items}) == 3
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams())
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if p.requires_grad and "lora_B" in n)  # A gets none while B is still zero


def test_v1_checkpoint_uses_the_original_weight_names_and_loads_without_gaps(tiny_v1_dir):
    with safe_open(tiny_v1_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    # deepseek-ai/DeepSeek-OCR's remote-code layout: sam_model/vision_model/projector, fused CLIP qkv_proj,
    # one tensor per routed expert.
    assert any(k.startswith("model.sam_model.blocks.0.attn.qkv") for k in keys)
    assert any(k.endswith("self_attn.qkv_proj.weight") and "vision_model.transformer" in k for k in keys)
    assert "model.projector.layers.weight" in keys and "model.view_seperator" in keys
    assert any(re.fullmatch(r"model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight", k) for k in keys)
    from transformers import UnlimitedOcrForConditionalGeneration

    family = get_family("deepseek-ocr")
    model, info = UnlimitedOcrForConditionalGeneration.from_pretrained(
        tiny_v1_dir, config=family.load_config(tiny_v1_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert model.config.text_config.layer_types == ["full_attention"] * 2  # v1 attends to all it generated
    config = json.loads((tiny_v1_dir / "config.json").read_text())
    assert config["model_type"] == "unlimited_ocr"


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_loss_on_target_positions_equals_the_full_loss(checkpoints, family_name):
    """train.logits_on_targets: left padding and the LM head over the target positions only give the loss
    (and gradients) of the plain right-padded forward."""
    from ocr_finetune.train import batch_loss

    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page(size), PROMPT, text, 48)
             for size, text in (((500, 600), "# A"), ((800, 1000), "| a | b |\n| --- | --- |"),
                                ((1000, 700), "long text " * 9))]
    losses, grads = [], []
    for left in (False, True):
        torch.manual_seed(0)
        model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams())
        perturb_lora(model, 0.1)
        loss = batch_loss(model, pad_batch(items, processor.tokenizer.pad_token_id, family, left=left), left)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for n, p in sorted(model.named_parameters()) if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_cached_vision_features_give_the_loss_and_gradients_of_pixels(checkpoints, family_name):
    """train.cache_vision_features (lora.mode llm): features computed once, in place of the pixels, give the
    step the same loss and adapter gradients as running the frozen vision towers in the step."""
    from ocr_finetune.train import batch_loss, image_features

    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page(size, box), PROMPT, text, 48)
             for size, box, text in (((500, 600), None, "# A"), ((1300, 900), [50, 80, 900, 300], "| a | b |"),
                                     ((700, 700), [10, 300, 600, 650], "long text " * 9))]
    torch.manual_seed(0)
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams(mode="llm"))
    perturb_lora(model, 0.1)
    model.train()
    pad = processor.tokenizer.pad_token_id
    losses, grads = [], []
    for cached in (False, True):
        if cached:
            for x, f in zip(items, image_features(model, family.collate_pixels([x.pixel for x in items]))):
                x.features, x.pixel = f, {}
            assert [x.image_tokens for x in items] == [len(x.features) for x in items]
        batch = pad_batch(items, pad, family, left=True)
        assert ("image_features" in batch) == cached and ("pixel_values" in batch) != cached
        loss = batch_loss(model, batch, True)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad]))
        model.zero_grad(set_to_none=True)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("mode", ["llm", "vision"])
def test_lora_computes_in_the_model_dtype_with_float32_weights(tiny_dir, mode):
    """lora.compute=model_dtype: on a bf16 model the LoRA branches see bf16 inputs (no float32 copy of the
    activations), while their weights and gradients stay float32; the loss matches PEFT's float32 branches
    within bf16 rounding."""
    family = get_family("deepseek-ocr2")
    processor = family.load_processor(tiny_dir, "gundam")
    items = [family.encode_example(processor, page((800, 1000)), PROMPT, "| a | b |\n| --- | --- |", 48)]
    batch = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in pad_batch(items, processor.tokenizer.pad_token_id, family).items()}
    losses = {}
    for compute in ("float32", "model_dtype"):
        torch.manual_seed(0)
        model = attach_lora_from_params(family.load_model(tiny_dir, torch.bfloat16, "cpu"), family,
                                        LoraParams(mode=mode, compute=compute))
        perturb_lora(model, 0.05)
        seen = set()
        hooks = [m.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype))
                 for n, m in model.named_modules() if n.endswith("lora_A.default")]
        loss = model(**batch).loss
        loss.backward()
        for h in hooks:
            h.remove()
        assert seen == {torch.float32 if compute == "float32" else torch.bfloat16}
        trained = [p for p in model.parameters() if p.requires_grad]
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in trained)
        assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
        losses[compute] = loss.item()
    assert losses["model_dtype"] == pytest.approx(losses["float32"], rel=2e-2)


@pytest.mark.parametrize("kernel", ["flash", "cudnn"])  # cudnn: v not padded to q and k's head size
@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_fused_sam_attention_matches_the_original_layer(checkpoints, family_name, kernel):
    """models._deepseek.use_fused_sam_attention: the relative-position bias folded into q and k gives the
    original layer's image features and LoRA gradients (float32), for windowed and global layers."""
    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page((1300, 900), [50, 80, 900, 300]), PROMPT, "| a | b |", 48)]
    model = family.load_model(path, torch.float32, "cpu")
    assert family.use_fused_sam_attention(model, kernel) > 0
    model = attach_lora_from_params(model, family, LoraParams(mode="vision"))
    sam = [m for m in model.modules() if type(m).__name__.endswith("SamVisionSdpaAttention")]
    assert sam and all("forward" in vars(m) for m in sam)
    assert len({m.rel_pos_h.shape[0] for m in sam}) == 2  # windowed and global layers
    torch.manual_seed(0)
    with torch.no_grad():
        for m in sam:  # SAM's zero init would make the bias vanish
            m.rel_pos_h.normal_(0, 0.5), m.rel_pos_w.normal_(0, 0.5)
    perturb_lora(model, 0.1)
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family)
    views = {k: batch[k] for k in ("pixel_values", "pixel_values_local", "num_local_patches", "patches_grid")
             if k in batch}
    results = []
    for fused in (True, False):
        if not fused:
            for m in sam:
                del m.forward  # back to the class's forward: the materialised bias
        features = torch.cat(model.get_base_model().get_image_features(**views, return_dict=True).pooler_output)
        features.square().mean().backward()
        grads = torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results.append((features.detach(), grads))
        model.zero_grad(set_to_none=True)
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)


def test_adaptive_experts_match_the_eager_experts_at_every_size(tiny_dir, monkeypatch):
    """models.moe: each plan (routed-weight copies for a few tokens, every expert on every token for decode
    batches, grouped_mm for long inputs) gives the experts' eager output, and the dense plan's gradients."""
    from ocr_finetune.models import moe

    # the tiny model has 4 experts, top 2: at the default switch point one token would already be dense
    monkeypatch.setattr(moe, "BATCHED_MM_MAX_ROUTES_PER_EXPERT", 1.0)
    plans = set()
    model = get_family("deepseek-ocr2").load_model(tiny_dir, torch.float32, "cpu")
    experts = next(m for m in model.modules() if type(m).__name__.endswith("TextExperts"))
    eager = type(experts).forward.__wrapped__
    torch.manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.2), experts.down_proj.normal_(0, 0.2)
    top_k = model.config.text_config.num_experts_per_tok
    for tokens in (1, 2, 9, moe.DENSE_MAX_TOKENS + 3):
        hidden = torch.randn(tokens, experts.hidden_dim, requires_grad=True)
        index = torch.stack([torch.randperm(experts.num_experts)[:top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, top_k).softmax(-1)
        expected = eager(experts, hidden, index, weights)
        got = moe.adaptive_experts_forward(experts, hidden, index, weights)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), tokens
        plans.add(moe.experts_plan(tokens, top_k, experts.num_experts))
        if 1 < tokens <= moe.DENSE_MAX_TOKENS:
            g_expected = torch.autograd.grad(expected.square().sum(), [hidden, experts.gate_up_proj])
            g_got = torch.autograd.grad(got.square().sum(), [hidden, experts.gate_up_proj])
            assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(g_got, g_expected))
    assert plans == {"batched_mm", "dense", "grouped_mm"}


def test_experts_plan_copies_routed_experts_only_below_half_a_route_per_expert():
    """DeepSeek-OCR-2's 64 experts, top 6: batched_mm up to batch 5 (30 copies), dense from 6 to 256 tokens
    (measured switch point, models/moe.py), grouped_mm beyond."""
    from ocr_finetune.models.moe import DENSE_MAX_TOKENS, experts_plan

    assert [experts_plan(t, 6, 64) for t in (1, 5, 6, 8, DENSE_MAX_TOKENS, DENSE_MAX_TOKENS + 1)] == [
        "batched_mm", "batched_mm", "dense", "dense", "dense", "grouped_mm"]


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_adaptive_experts_keep_greedy_decoding(checkpoints, family_name):
    """model.adaptive_experts: a batch of pages decodes to the same greedy tokens as transformers' own
    experts, every MoE call going through ours. (That generate() does not switch it to batched_mm, which
    it does only on GPUs, is checked in test_gpu.py.)"""
    from ocr_finetune.models import moe

    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    images = [page((500, 600)), page((1300, 900), [50, 80, 900, 300]), page((700, 700), [10, 300, 600, 650])]
    inputs, width = family.generation_inputs(processor, images, PROMPT)
    model = family.load_model(path, torch.float32, "cpu").eval()
    tok = processor.tokenizer
    outputs = []
    for adaptive in (False, True):
        if adaptive:
            moe.use_adaptive_experts(model)
        calls = []
        experts = [m for m in model.modules() if type(m).__name__.endswith("TextExperts")]
        hooks = [m.register_forward_hook(lambda m, args, out: calls.append(m.config._experts_implementation))
                 for m in experts]
        with torch.inference_mode():
            outputs.append(model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
        for h in hooks:
            h.remove()
        assert set(calls) == ({moe.NAME} if adaptive else {"grouped_mm"})
    assert torch.equal(outputs[0][:, width:], outputs[1][:, width:])


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_checkpointing_scopes_keep_loss_and_gradients(checkpoints, family_name):
    """train.gradient_checkpointing: true recomputes every layer, `vision` only the vision towers' layers;
    both give the loss and LoRA gradients of no checkpointing."""
    from ocr_finetune.train import batch_loss, enable_checkpointing

    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page((1300, 900), [50, 80, 900, 300]), PROMPT, "| a | b |", 48)]
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family, left=True)
    results = {}
    for scope in (False, True, "vision"):
        torch.manual_seed(0)
        model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family,
                                        LoraParams(mode="both"))
        perturb_lora(model, 0.1)
        if scope:
            layers = {n: m.gradient_checkpointing for n, m in model.named_modules()
                      if hasattr(m, "gradient_checkpointing") and ".layers." in n}
            assert enable_checkpointing(model, scope) > 0
            on = {n for n, m in model.named_modules() if n in layers and m.gradient_checkpointing}
            vision = {n for n in layers if ".vision_tower." in n}
            assert on == (set(layers) if scope is True else vision) and vision
            recomputed = set()  # layers whose forward really went through the checkpoint function
            for n, m in model.named_modules():
                if n in layers:
                    m._gradient_checkpointing_func = functools.partial(
                        lambda f, name, *a, **k: recomputed.add(name) or f(*a, **k), m._gradient_checkpointing_func, n)
        model.train()
        loss = batch_loss(model, batch, True)
        loss.backward()
        if scope:
            assert recomputed == on
        results[scope] = (loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())
                                                  if p.requires_grad]))
    for scope in (True, "vision"):
        assert results[scope][0] == pytest.approx(results[False][0], rel=1e-5)
        assert torch.allclose(results[scope][1], results[False][1], rtol=1e-3, atol=1e-6)


# DeepSeek-OCR (v1) goes through the same wrapper (compiled.py); its run here (30 s of CPU compiling) was cut
# for the suite's time
@pytest.mark.parametrize("family_name", ["deepseek-ocr2"])
def test_compiled_layers_give_the_eager_loss_and_gradients(checkpoints, family_name):
    """train.compile (compiled.py): layers compiled in place, inside transformers' gradient checkpointing,
    give the eager step's loss and LoRA gradients (fp32, CPU inductor), over views of two grid sizes."""
    from ocr_finetune.compiled import compile_layers
    from ocr_finetune.train import batch_loss, enable_checkpointing

    family, tiny_dir = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(tiny_dir, "gundam")
    items = [family.encode_example(processor, page(size, box), PROMPT, text, 32)
             for size, box, text in (((500, 600), None, "# A"), ((1300, 900), [50, 80, 900, 300], "| a | b |"))]
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family, left=True)
    results = []
    torch._dynamo.reset()  # graphs compiled by an earlier test would not count below
    for compiled in (False, True):
        torch.manual_seed(0)
        model = family.load_model(tiny_dir, torch.float32, "cpu")
        family.use_fused_sam_attention(model)
        model = attach_lora_from_params(model, family, LoraParams(mode="both"))
        perturb_lora(model, 0.1)
        enable_checkpointing(model, "vision")
        if compiled:
            n = compile_layers(model, "all")
            assert n == sum(1 for m in model.modules() if type(m).__name__.endswith("Layer")
                            and hasattr(m, "gradient_checkpointing")) and n > 0
        model.train()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        loss = batch_loss(model, batch, True)
        loss.backward()
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs) == compiled
        results.append((loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())
                                                if p.requires_grad])))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_chunked_loss_equals_the_full_loss(checkpoints, family_name):
    """train.loss_chunk: the LM head taken out of the model and run over a few positions at a time gives the
    loss and LoRA gradients of the full logits; the head goes back afterwards."""
    from ocr_finetune.train import attach_lm_head, batch_loss, detach_lm_head

    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page(size, box), PROMPT, text, 48)
             for size, box, text in (((500, 600), None, "# A\n\nshort"), ((1300, 900), [50, 80, 900, 300],
                                                                          "| a | b |\n| --- | --- |\n" * 3))]
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family, left=True)
    torch.manual_seed(0)
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams(mode="llm"))
    perturb_lora(model, 0.1)
    model.train()
    results = []
    for chunk in (0, 7):  # 7: chunks that split a page's targets, and chunks holding only padding
        head = detach_lm_head(model) if chunk else None
        loss = batch_loss(model, batch, True, head, chunk)
        loss.backward()
        if head is not None:
            attach_lm_head(model, head)
        results.append((loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())
                                                if p.requires_grad])))
        model.zero_grad(set_to_none=True)
    assert type(model.get_base_model().lm_head).__name__ == "Linear"
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_vision_tower_in_passes_gives_the_same_loss_and_gradients(checkpoints, family_name):
    """model.vision_batch: the vision tower over at most 2 images at a time (3 pages of global views and up to
    9 tiles) gives the loss and LoRA gradients (mode both) of one pass, and no pass holds more than 2 images."""
    family, path = get_family(family_name), checkpoints[family_name]
    processor = family.load_processor(path, "gundam")
    items = [family.encode_example(processor, page(size, box), PROMPT, text, 48)
             for size, box, text in (((500, 600), None, "# A\n\nshort"), ((1300, 900), [50, 80, 900, 300], "x y z"),
                                     ((900, 1400), [100, 100, 500, 700], "| a | b |\n| --- | --- |\n"))]
    batch = pad_batch(items, processor.tokenizer.pad_token_id, family, left=True)
    assert batch["pixel_values_local"].shape[0] > 2
    torch.manual_seed(0)
    model = attach_lora_from_params(family.load_model(path, torch.float32, "cpu"), family, LoraParams(mode="both"))
    perturb_lora(model, 0.1)
    model.train()
    patch_embed = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 3)
    images_seen = []
    patch_embed.register_forward_pre_hook(lambda _, args: images_seen.append(args[0].shape[0]))
    results = []
    for images_per_pass in (0, 2):
        assert family.chunk_vision_tower(model, images_per_pass)
        images_seen.clear()
        loss = batch_loss(model, batch, True)
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for _, p in sorted(model.named_parameters())
                                                if p.requires_grad]), max(images_seen)))
        model.zero_grad(set_to_none=True)
    assert results[0][2] > 2 and results[1][2] == 2
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert torch.allclose(results[1][1], results[0][1], rtol=1e-3, atol=1e-6)


def test_v1_decoding_keeps_every_generated_token_in_view(tiny_v1_dir, tmp_path):
    """Past 128 generated tokens, each decode step's logits still equal a full forward pass over the whole
    sequence: load_model turns off the class's default window (which drops generated tokens older than 128
    from view). The checkpoint's config names no attention types, as the hub's v1 configs do; loaded plainly,
    the same check fails."""
    import shutil

    from transformers import UnlimitedOcrForConditionalGeneration

    family = get_family("deepseek-ocr")
    hub_like = tmp_path / "v1"
    shutil.copytree(tiny_v1_dir, hub_like)
    config = json.loads((hub_like / "config.json").read_text())
    config["text_config"].pop("layer_types")
    (hub_like / "config.json").write_text(json.dumps(config))
    processor = family.load_processor(hub_like, "base")
    inputs, _ = family.generation_inputs(processor, [page((300, 400))], PROMPT)
    pixels = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    new = 150

    def decode_vs_full(model):
        with torch.no_grad():
            out = model.eval().generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                        output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                                        pad_token_id=processor.tokenizer.pad_token_id)
            sequence = out.sequences[:, :-1]
            full = model(input_ids=sequence, attention_mask=torch.ones_like(sequence), **pixels).logits[:, -new:]
        return (torch.stack(out.logits, 1) - full)[:, 130:].abs().max().item()

    assert decode_vs_full(family.load_model(hub_like, torch.float32, "cpu")) < 1e-4
    assert decode_vs_full(UnlimitedOcrForConditionalGeneration.from_pretrained(hub_like)) > 1e-2


@pytest.mark.parametrize("family_name", ["deepseek-ocr2", "deepseek-ocr"])
def test_vision_tower_in_passes_joins_every_output(checkpoints, family_name):
    """Tuples (return_dict=False) and per-layer hidden states come back whole from passes of equal size."""
    family = get_family(family_name)
    model = family.load_model(checkpoints[family_name], torch.float32, "cpu")
    tower = next(m.vision_tower for m in model.modules() if hasattr(m, "multi_modal_projector"))
    side = model.config.vision_config.sam_config.image_size
    images = torch.randn(5, 3, side, side)
    with torch.no_grad():
        whole = tower(images, output_hidden_states=True)
        whole_tuple = tower(images, return_dict=False)
        assert family.chunk_vision_tower(model, 2)
        passes = tower(images, output_hidden_states=True)
        passes_tuple = tower(images, return_dict=False)
    assert isinstance(passes_tuple, tuple) and len(passes_tuple) == len(whole_tuple)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_tuple, passes_tuple))
    assert len(passes.hidden_states) == len(whole.hidden_states) > 1
    for a, b in zip((whole.last_hidden_state, *whole.hidden_states), (passes.last_hidden_state, *passes.hidden_states)):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


def test_cudnn_sam_attention_only_at_the_head_sizes_it_was_tried_at():
    """v1's `large` view (1280px: 64 + 80 + 80 = 224) would need cuDNN's 256/256, which the setup trial does
    not cover and which pads more than flash: those layers stay on flash."""
    from ocr_finetune.models._deepseek import _cudnn_head_sizes

    assert _cudnn_head_sizes(96, 64) == (96, 64) and _cudnn_head_sizes(192, 64) == (192, 128)
    assert _cudnn_head_sizes(144, 64) == (192, 128) and _cudnn_head_sizes(224, 64) is None
