"""What the DeepSeek-OCR families share: the prompt format, label masking, batching of image views, and the
offline tokenizer of the tiny test models.

Both native processors expand `<image>` into the right number of image tokens and return the page's views
(`pixel_values` global, `pixel_values_local` tiles, `num_local_patches`, and for v1 `patches_grid`); the
model reads them by name, so one encoder/collator serves both families.
"""

from __future__ import annotations

import contextlib
import json
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .base import Encoded, resolve_checkpoint, write_json

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
TINY_VERSION = 2  # bump when a tiny architecture, its init or the tokenizer changes, so cached copies are rebuilt
TENSOR_VIEWS = ("pixel_values", "pixel_values_local")
# The routed experts are fused 3-D parameters, not nn.Linear: PEFT adapts them through `target_parameters`.
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
LIST_VIEWS = ("num_local_patches", "patches_grid")


def load_tokenizer(path):
    """The checkpoint's tokenizer without remote code and without transformers' interactive "run the custom
    code? [y/N]" prompt: deepseek-ai's repositories name a tokenizer class of their own remote code
    (auto_map); their tokenizer.json is a plain fast tokenizer, read as one."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except ValueError as e:
        if "custom code" not in str(e) and "trust_remote_code" not in str(e):
            raise
        return PreTrainedTokenizerFast.from_pretrained(path)


def official_global_view(processor, image, target: int, background_color, resample):
    """The global view as the official inference code makes it, `ImageOps.pad(image, (target, target))`:
    resized to fit (sizes rounded as PIL rounds them) and pasted at round(margin / 2). transformers' processor
    pads with floor(margin / 2): a quarter of page sizes land one pixel off (US letter at 1280: x 145 vs 146).
    `image` is channels-first (the processors' PIL backend)."""
    import numpy as np
    from transformers.image_utils import SizeDict

    channels, height, width = image.shape
    if width / height == 1.0:
        return processor.resize(image, SizeDict(height=target, width=target), resample=resample)
    if width > height:
        new_w, new_h = target, round(height / width * target)
    else:
        new_w, new_h = round(width / height * target), target
    if (new_h, new_w) != (height, width):
        image = processor.resize(image, SizeDict(height=new_h, width=new_w), resample=resample)
    out = np.empty((channels, target, target), dtype=image.dtype)
    out[:] = np.asarray(background_color, dtype=image.dtype).reshape(-1, 1, 1)
    y, x = round((target - new_h) * 0.5), round((target - new_w) * 0.5)
    out[:, y:y + new_h, x:x + new_w] = image
    return out


def tiny_tokenizer():
    """A byte-level BPE trained in code on fixed text: covers every string, downloads nothing."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..samples import DOCUMENTS, pages_markdown

    corpus = [md for spec in DOCUMENTS.values() for md in pages_markdown(spec["blocks"])]
    corpus += ["Convert the document to markdown.", "| --- | --- |", "0123456789 .,;:!?()[]{}#*-+=/%&@"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # special as in DeepSeek-OCR's tokenizer, the grounding and table tags included: decoding must keep them
    specials = [BOS, EOS, PAD, "<image>", "<|User|>", "<|Assistant|>", "<|grounding|>", "<|ref|>", "<|/ref|>",
                "<|det|>", "<|/det|>", "<td>", "</td>", "<tr>", "</tr>"]
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=4096)


def special_ids(tokenizer) -> dict:
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def save_random(model_cls, config, processor, out_dir: Path, marker: dict, device: str, dtype: torch.dtype,
                seed: int, adjust=None) -> Path:
    """Write a random checkpoint (model, tokenizer, processor) like a downloaded one, once per marker.
    `adjust(model)`: changes to the random weights before they are saved."""
    stamp = out_dir / "tiny.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == marker:
        return out_dir
    with torch.random.fork_rng(devices=[]), torch.device(device):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = model_cls(config)
        if adjust is not None:
            with torch.no_grad():
                adjust(model)
        model = model.to(dtype)
    for key, value in special_ids(processor.tokenizer).items():
        setattr(model.generation_config, key, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    write_json(stamp, marker)
    return out_dir


def checkpoint_dir(base: str, cache_dir: str | Path, allow_download: bool, tiny_name: str, build_tiny,
                   size_hint: str) -> Path:
    if base == "tiny":
        return build_tiny(Path(cache_dir) / tiny_name)
    return resolve_checkpoint(base, cache_dir, allow_download, size_hint=size_hint)


# ---------------------------------------------------------------- inputs

def with_preset(processor, preset: dict):
    """Attach a resolution preset to a processor. It must be passed on every call: the processor class's own
    `images_kwargs` defaults (OCR-2: crop_to_patches=True, 2..6 tiles) override the image processor's
    settings, so a preset set only on the image processor would tile pages anyway."""
    processor.resolution_preset = dict(preset)
    return processor


def encode_prompt(processor, image, prompt: str) -> dict:
    """Tokenise BOS + prompt with the image's placeholder tokens expanded; returns processor tensors (batch 1).
    The prompt is stripped first, as the official infer() does (format_messages): a space around it is a
    token of its own otherwise (DeepSeek's README prompt ends with one)."""
    tok = processor.tokenizer
    return processor(images=[image], text=[tok.bos_token + prompt.strip()], add_special_tokens=False, return_tensors="pt",
                     **getattr(processor, "resolution_preset", {}))


def encode_example(processor, image, prompt: str, target: str, max_label_tokens: int) -> Encoded:
    enc = encode_prompt(processor, image, prompt)
    prompt_ids = enc["input_ids"][0]
    image_tokens = int((prompt_ids == processor.image_token_id).sum())
    return _with_target(processor, prompt_ids, target, max_label_tokens, pixel=views(enc), image_tokens=image_tokens)


def encode_text(processor, prompt: str, target: str, image_tokens: int, max_label_tokens: int) -> Encoded:
    """encode_example without the image, for a page whose image features are already known (feature_cache):
    the processor expands `<image>` into `image_tokens` image tokens and tokenises, as here (a test keeps the
    two equal)."""
    tok = processor.tokenizer
    text = tok.bos_token + prompt.strip().replace(processor.image_token, processor.image_token * image_tokens)
    prompt_ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return _with_target(processor, prompt_ids, target, max_label_tokens, pixel={}, image_tokens=image_tokens)


def _with_target(processor, prompt_ids: torch.Tensor, target: str, max_label_tokens: int, **fields) -> Encoded:
    tok = processor.tokenizer
    target_ids = tok(target, add_special_tokens=False)["input_ids"]
    label_tokens = len(target_ids)
    # A label cut short ends without EOS: with one, the model would learn to stop in the middle of a page.
    target_ids = target_ids[:max_label_tokens] if label_tokens > max_label_tokens else target_ids + [tok.eos_token_id]
    target_ids = torch.tensor(target_ids, dtype=prompt_ids.dtype)
    # The loss sees only the target: BOS, prompt text and every image token are masked.
    labels = torch.cat([torch.full_like(prompt_ids, -100), target_ids])
    return Encoded(input_ids=torch.cat([prompt_ids, target_ids]), labels=labels, label_tokens=label_tokens, **fields)


def views(enc) -> dict:
    """One page's image inputs, as the processor returned them."""
    out = {k: enc[k] for k in TENSOR_VIEWS if k in enc}
    out.update({k: _as_list(enc[k]) for k in LIST_VIEWS if k in enc})
    return out


def _as_list(value):
    return value.tolist() if isinstance(value, torch.Tensor) else list(value)


def collate_pixels(pixels: list[dict], pin: bool = False) -> dict:
    """Batch per-page image inputs; pages may have different numbers of tiles (tiles are concatenated and
    `num_local_patches` says whose they are). `pin`: straight into page-locked memory, for a copy to the GPU
    that does not block (one copy of a batch's pixels fewer on the host than concatenating, then pinning)."""
    batch = {}
    for key in TENSOR_VIEWS:
        parts = [p[key] for p in pixels if key in p]
        if parts:
            out = None
            if pin:
                shape = (sum(len(x) for x in parts), *parts[0].shape[1:])
                out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=True)
            batch[key] = torch.cat(parts, out=out)
    for key in LIST_VIEWS:
        if any(key in p for p in pixels):
            batch[key] = [x for p in pixels for x in p[key]]
    return batch


def generation_inputs(processor, images, prompt: str) -> tuple[dict, int]:
    """Left-padded batch of prompts for generate(); returns (inputs, prompt length)."""
    return collate_prompts([prompt_inputs(processor, im, prompt) for im in images], processor.tokenizer.pad_token_id)


def prompt_inputs(processor, image, prompt: str) -> dict:
    """One page's generation inputs: its prompt ids (1-D) and image views."""
    enc = encode_prompt(processor, image, prompt)
    return {"input_ids": enc["input_ids"][0], **views(enc)}


def collate_prompts(pages: list[dict], pad_id: int, pin: bool = False) -> tuple[dict, int]:
    """prompt_inputs of several pages as one left-padded batch; returns (inputs, prompt length). `pin`: the
    pixels in page-locked memory (collate_pixels)."""
    width = max(len(p["input_ids"]) for p in pages)
    ids = torch.full((len(pages), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pages), width), dtype=torch.long)
    for i, p in enumerate(pages):
        n = len(p["input_ids"])
        ids[i, width - n:] = p["input_ids"]
        mask[i, width - n:] = 1
    pixels = collate_pixels([{k: v for k, v in p.items() if k != "input_ids"} for p in pages], pin)
    return {"input_ids": ids, "attention_mask": mask, **pixels}, width


# ---------------------------------------------------------------- the vision tower over a few images at a time

def chunk_vision_tower(model, images_per_pass: int) -> bool:
    """Run the vision tower (SAM and the second encoder) over at most `images_per_pass` images at a time and
    join the outputs; 0 runs every image at once. Returns whether the model has such a tower.

    A page in gundam mode is a 1024px view and up to 6 tiles of 768px, 17,920 SAM tokens, and
    `get_image_features` hands the tower every page's tiles at once. With gradient checkpointing, the backward
    pass recomputes each layer for all of them together, and that layer's intermediates, about 0.3 GB a page,
    are the largest transient of the step; the same holds for one inference prefill over a large batch. In
    passes, each pass's layers are separate checkpoints, recomputed one pass after the other. The outputs and
    gradients are the same; a pass of 16 images is still tens of thousands of tokens, so the kernels stay large.
    """
    owner = next((m for m in model.modules() if isinstance(getattr(m, "vision_tower", None), torch.nn.Module)
                  and hasattr(m, "multi_modal_projector")), None)
    if owner is None:
        return False
    tower = owner.vision_tower
    # the forward in place before the first call (a hook's wrapper, say), kept so that calling this again
    # replaces the passes rather than nesting them
    tower.__dict__.setdefault("_forward_in_one_pass", tower.forward)
    tower._images_per_pass = images_per_pass
    tower.forward = types.MethodType(_forward_in_passes, tower)  # bound: a deepcopy calls its own tower
    return True


def _forward_in_passes(self, pixel_values, *args, **kwargs):
    forward, per_pass, n = self._forward_in_one_pass, self._images_per_pass, pixel_values.shape[0]
    if per_pass <= 0 or n <= per_pass:
        return forward(pixel_values, *args, **kwargs)
    # passes of equal size (17 images: 9 + 8, not 16 + 1): a pass of one image would make the compiled layers
    # specialise and compile again
    parts = [forward(chunk, *args, **kwargs) for chunk in torch.tensor_split(pixel_values, -(-n // per_pass))]
    if isinstance(parts[0], tuple):  # return_dict=False
        return tuple(_join(list(field)) for field in zip(*parts))
    return type(parts[0])(**{key: _join([part[key] for part in parts]) for key in parts[0].keys()})


def _join(values: list):
    if isinstance(values[0], torch.Tensor):
        return torch.cat(values)
    if isinstance(values[0], tuple):  # hidden states or attentions: one tensor per layer
        return tuple(_join(list(layer)) for layer in zip(*values))
    raise TypeError(f"cannot join vision tower outputs of type {type(values[0]).__name__}")


# ---------------------------------------------------------------- SAM attention without a materialised bias

def use_fused_sam_attention(model, kernel: str = "flash") -> int:
    """Give the SAM encoder's attention layers a forward that folds the relative-position bias into the
    dot product, so SDPA runs its flash kernel instead of reading an N x N bias. Returns the layers changed.

    SAM adds a decomposed relative-position bias to every score: rel_h[i, row(j)] + rel_w[i, col(j)]. The
    transformers code materialises it as a (heads, N, N) tensor, N = 4096 for the 1024px view, so each global
    layer writes and reads 400 MB per image, SDPA falls back to kernels that take a bias, and training stores
    and reduces an N x N bias gradient. The same scores come from longer vectors: q' = [q * scale, rel_h, rel_w]
    and k' = [k, onehot(row(j)), onehot(col(j))], so q'.k' = scale q.k + bias. Exact in exact arithmetic;
    checked against the original layer in tests/test_model_families.py.

    kernel: `flash` pads v to q' and k' 's head size (flash kernels need one size: 192 for the 1024px view's
    64 + 64 + 64, so p.v does 3x the work); `cudnn` runs cuDNN's attention, which takes a shorter v on Hopper
    (`_cudnn_head_sizes`), and falls back to `flash` where a trial step fails. On the CPU both run the same
    math.
    """
    if kernel not in SAM_KERNELS:
        raise ValueError(f"unknown SAM attention kernel {kernel!r} (allowed values: {', '.join(SAM_KERNELS)})")
    weight = next(model.parameters())
    if kernel == "cudnn" and weight.is_cuda and not _cudnn_trains(weight.device, weight.dtype):
        print("note: this GPU's cuDNN attention cannot train SAM's head sizes; model.sam_attention_kernel=flash "
              "is used instead", flush=True)
        kernel = "flash"
    changed = 0
    for module in model.modules():
        if type(module).__name__.endswith("SamVisionSdpaAttention") and module.use_rel_pos:
            module.forward = types.MethodType(_sam_attention_forward, module)
            module.fused_kernel = kernel
            changed += 1
    return changed


SAM_KERNELS = ("flash", "cudnn")


def _cudnn_head_sizes(qk: int, v: int) -> tuple[int, int] | None:
    """The q/k and v head sizes to pad to for cuDNN attention, forward and backward, as PyTorch's checks allow
    them on Hopper: both up to 128, or 192 with 128 (DeepSeek-V3's attention shape). None past those: 256 with
    256 is allowed too but pads more than flash does (v1's `large` view: 224) and is not in the trial."""
    if qk <= 128 and v <= 128:
        return qk, v
    if qk <= 192 and v <= 128:
        return 192, 128
    return None


def _cudnn_trains(device, dtype) -> bool:
    """Whether cuDNN attention runs forward and backward here at the shapes SAM needs (windowed layers: 196
    tokens, heads of 64 + 14 + 14 -> 96 with 64; global layers: 4096 tokens, 192 with 128): one small step of
    each, two heads, a few milliseconds."""
    # grad on even where the model is set up under no_grad or inference_mode: else any GPU would fail the trial
    with torch.inference_mode(False), torch.enable_grad():
        try:
            for n, (qk, v) in ((196, _cudnn_head_sizes(96, 64)), (4096, _cudnn_head_sizes(192, 64))):
                q, k = (torch.randn(1, 2, n, qk, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
                vv = torch.randn(1, 2, n, v, device=device, dtype=dtype, requires_grad=True)
                with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                    F.scaled_dot_product_attention(q, k, vv, scale=1.0).sum().backward()
            return True
        except RuntimeError:
            return False


def _sam_attention_forward(self, hidden_states: torch.Tensor, output_attentions=False):
    batch, height, width, _ = hidden_states.shape
    n, heads = height * width, self.num_attention_heads
    qkv = self.qkv(hidden_states).reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (batch, heads, n, head_dim)
    head_dim = query.shape[-1]
    rows = self.get_rel_pos(height, height, self.rel_pos_h).to(query.dtype)  # (height, height, head_dim)
    cols = self.get_rel_pos(width, width, self.rel_pos_w).to(query.dtype)
    grid = query.reshape(batch, heads, height, width, head_dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid, rows).reshape(batch, heads, n, height)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid, cols).reshape(batch, heads, n, width)
    eye_h = torch.eye(height, dtype=query.dtype, device=query.device).repeat_interleave(width, dim=0)  # row(j)
    eye_w = torch.eye(width, dtype=query.dtype, device=query.device).repeat(height, 1)  # col(j)
    query = torch.cat([query * self.scale, rel_h, rel_w], dim=-1)
    key = torch.cat([key, eye_h.expand(batch, heads, n, height), eye_w.expand(batch, heads, n, width)], dim=-1)
    dim = -(-query.shape[-1] // 8) * 8  # fused kernels take head sizes in multiples of 8
    # flash kernels take one head size for q, k and v; cuDNN a shorter v (96/64 windowed, 192/128 global)
    sizes = _cudnn_head_sizes(dim, head_dim) if getattr(self, "fused_kernel", "flash") == "cudnn" else None
    cudnn = sizes is not None
    qk, v = sizes or (dim, dim)
    query, key = F.pad(query, (0, qk - query.shape[-1])), F.pad(key, (0, qk - key.shape[-1]))
    value = F.pad(value, (0, v - head_dim))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if cudnn and query.is_cuda else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :head_dim]
    out = out.reshape(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
    return self.proj(out), None
