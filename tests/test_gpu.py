"""GPU-only checks (skipped without CUDA; run on the GPU machine): the fast decoding path that infer, evaluate
and the local teacher use by default on CUDA gives what plain decoding gives, within bf16 tolerance."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_static_cache_decoding_matches_plain_decoding(models_cache):
    from PIL import Image, ImageDraw

    from ocr_finetune.infer import LocalModel
    from ocr_finetune.models import moe
    from ocr_finetune.params import validate_params

    model = {"cache_dir": str(models_cache), "resolution": "gundam"}
    params = validate_params({"model": model, "train": {"dtype": "bfloat16"}})
    plain_params = validate_params({"model": {**model, "fused_sam_attention": False, "adaptive_experts": False},
                                    "train": {"dtype": "bfloat16"}})
    pages = []
    for i in range(3):
        im = Image.new("RGB", (1240, 1754), "white")
        ImageDraw.Draw(im).rectangle([60, 60 + 600 * i, 1100, 500 + 600 * i], fill="black")
        pages.append(im)
    # fast: the defaults (static cache, fused SAM attention, adaptive experts); plain: transformers' own path
    fast, plain = LocalModel(params, device="cuda"), LocalModel(plain_params, device="cuda", static_cache=False)
    assert fast.static_cache and not plain.static_cache
    steps = 16
    outs = {}
    for name, model in (("fast", fast), ("plain", plain)):
        inputs, width = model.family.generation_inputs(model.processor, pages, "<image>\nFree OCR.")
        from ocr_finetune.data import to_device

        inputs = to_device(inputs, "cuda", torch.bfloat16)
        used = set()  # the experts implementation each MoE call ran under
        hooks = [m.register_forward_hook(lambda m, args, out: used.add(m.config._experts_implementation))
                 for m in model.model.modules() if type(m).__name__.endswith("TextExperts")]
        with torch.inference_mode():
            outs[name] = model.model.generate(
                **inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, output_scores=True,
                return_dict_in_generate=True, pad_token_id=model.processor.tokenizer.pad_token_id,
                cache_implementation="static" if model.static_cache else None)
        for h in hooks:
            h.remove()
        # generate() switches grouped_mm to batched_mm for decoding on GPUs; ours it leaves alone
        assert used == ({moe.NAME} if name == "fast" else {"grouped_mm", "batched_mm"})
    a, b = outs["fast"], outs["plain"]
    for row in range(len(pages)):
        for step in range(steps):
            sa, sb = a.scores[step][row].float(), b.scores[step][row].float()
            finite = torch.isfinite(sb)  # EOS is masked to -inf while min_new_tokens holds it back
            assert torch.equal(finite, torch.isfinite(sa))
            sa, sb = sa[finite], sb[finite]
            assert (sa - sb).norm() / sb.norm() < 2e-2, (row, step)  # bf16 tolerance
            if a.sequences[row, width + step] != b.sequences[row, width + step]:
                top2 = sb.topk(2).values
                assert top2[0] - top2[1] < 0.1, (row, step)  # only a near tie may flip a greedy token
                break  # the inputs differ from here on


@pytest.mark.parametrize("mode,kernel", [("llm", "flash"), ("both", "flash"), ("both", "cudnn")])
def test_fast_training_step_matches_the_plain_step(tiny_dir, mode, kernel):
    """What train() does by default on CUDA (fused SAM attention, LoRA in bf16 with float32 weights, vision
    features cached in llm mode, logits on targets only, in chunks, compiled layers) gives the plain transformers + PEFT step's loss and
    adapter gradients within bf16 tolerance."""
    from PIL import Image, ImageDraw

    from ocr_finetune.lora import attach_lora_from_params
    from ocr_finetune.models import get_family
    from ocr_finetune.params import LoraParams
    from ocr_finetune.compiled import compile_layers
    from ocr_finetune.data import pad_batch, to_device
    from ocr_finetune.train import batch_loss, detach_lm_head, enable_checkpointing, image_features

    family = get_family("deepseek-ocr2")
    processor = family.load_processor(tiny_dir, "gundam")
    pages = []
    for i, size in enumerate([(1240, 1754), (900, 700)]):
        im = Image.new("RGB", size, "white")
        ImageDraw.Draw(im).rectangle([40, 40 + 200 * i, size[0] - 60, 300 + 200 * i], fill="black")
        pages.append(im)
    results = {}
    for fast in (True, False):
        items = [family.encode_example(processor, im, "<image>\nFree OCR.", t, 64)
                 for im, t in zip(pages, ["# Title\n\nbody text", "| a | b |\n| --- | --- |"])]
        torch.manual_seed(0)
        model = family.load_model(tiny_dir, torch.bfloat16, "cuda")
        if fast:
            family.use_fused_sam_attention(model, kernel)
        model = attach_lora_from_params(model, family, LoraParams(mode=mode,
                                                                  compute="model_dtype" if fast else "float32"))
        if fast:  # compiled layers, and for `both` checkpointing of the vision towers around them
            assert compile_layers(model, "all") > 0
            if mode == "both":
                enable_checkpointing(model, "vision")
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        model.train()
        if fast and mode == "llm":
            for x in items:
                x.pixel = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                           for k, v in x.pixel.items()}  # as train() keeps them
            views = to_device(family.collate_pixels([x.pixel for x in items]), "cuda", torch.bfloat16)
            for x, f in zip(items, image_features(model, views)):
                x.features, x.pixel = f, {}
        batch = to_device(pad_batch(items, processor.tokenizer.pad_token_id, family, left=fast), "cuda",
                          torch.bfloat16)
        head = detach_lm_head(model) if fast else None  # train.loss_chunk
        loss = batch_loss(model, batch, fast, head, 48)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results[fast] = (loss.item(), grads)
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results[True], results[False]
    assert fast_loss == pytest.approx(plain_loss, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(fast_grads, plain_grads, dim=0) > 0.99
