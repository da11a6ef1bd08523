"""LoRA fine-tuning, in one loop you can read top to bottom.

    examples -> tensors -> (shuffle, batch, forward, backward, step) x steps -> adapter + metrics
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from . import __version__, distributed
from .checkpoint import Checkpoints, fingerprint
from .compiled import compile_layers
from .dataset import read_jsonl
from .lora import attach_lora_from_params, lora_modules, trainable_parameters
from .models import get_family
from .models.base import checkpoint_source, load_image, write_json
from .models.moe import use_adaptive_experts
from .params import Params
from .runtime import pick_device, pick_dtype, seed_everything
from .tracking import Tracker

RUN_INFO = "ocr_finetune.json"  # written beside the adapter: what it was trained from


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[float]
    trainable_params: int
    seconds: float
    pages_per_second: float = 0.0
    num_gpus: int = 1
    peak_memory_gib: float | None = None  # this process's GPU, None on CPU
    vision_feature_seconds: float = 0.0  # the one pass of train.cache_vision_features, before the steps
    model: object = field(default=None, repr=False)  # the trained PEFT model, still in memory


def load_base(params: Params, device: str, dtype: torch.dtype):
    family = get_family(params.model.family)
    path = family.checkpoint_dir(params.model.base, params.model.cache_dir, params.model.allow_download)
    extra = quantization(dtype, device) if params.model.load_in_4bit else {}
    model = family.load_model(path, dtype, device, **extra)
    if params.model.fused_sam_attention:
        family.use_fused_sam_attention(model, params.model.sam_attention_kernel)
    if params.model.adaptive_experts and device.startswith("cuda"):  # on CPU grouped_mm is faster
        use_adaptive_experts(model)
    family.chunk_vision_tower(model, params.model.vision_batch)
    return family, model, family.load_processor(path, params.model.resolution), path


def compile_scope(params: Params, device: str) -> str:
    """train.compile resolved. `auto` on CUDA compiles
    - the language model's layers, except with LoRA on the routed experts (PEFT rebuilds their parametrized
      class at every forward, so the layer would recompile every step) or a 4-bit base (not measured);
    - the vision towers' layers, except when they run once per page only (mode llm with cached features:
      compiling them takes longer than that one pass on a dataset under about a thousand pages).
    `auto` on CPU compiles nothing: it costs more there than it saves."""
    if params.train.compile != "auto":
        return params.train.compile
    if not device.startswith("cuda"):
        return "none"
    llm = not (params.lora.experts or params.model.load_in_4bit)
    vision = not (params.lora.mode == "llm" and params.train.cache_vision_features)
    return {(True, True): "all", (True, False): "llm", (False, True): "vision", (False, False): "none"}[llm, vision]


def enable_checkpointing(model, scope: bool | str) -> int:
    """Gradient checkpointing on every layer (`True`) or on the vision towers' layers only (`"vision"`).
    Returns the number of checkpointed layers."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)]
    for name, module in layers:
        module.gradient_checkpointing = scope is True or ".vision_tower." in f".{name}."
    return sum(m.gradient_checkpointing for _, m in layers)


def quantization(dtype: torch.dtype, device: str) -> dict:
    """QLoRA loading: language-model weights in 4-bit NF4; the vision towers, projector and head stay in
    `dtype` (small, and the adapters on them need real weights)."""
    if not device.startswith("cuda"):
        raise ValueError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set it to false on CPU")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError("model.load_in_4bit needs bitsandbytes: pip install 'ocr-finetune[gpu]'") from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=dtype,
                                llm_int8_skip_modules=["vision_tower", "multi_modal_projector", "lm_head"])
    return {"quantization_config": config, "device_map": {"": device}}


def pad_batch(items, pad_id: int, family, left: bool = False) -> dict:
    """Pad a list of Encoded examples into one batch (on the right, or on the left so that every example's
    target ends at the last position)."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span], labels[i, span], mask[i, span] = x.input_ids, x.labels, 1
    if all(x.features is not None for x in items):
        images = {"image_features": [x.features for x in items]}
    else:
        images = family.collate_pixels([x.pixel for x in items])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, **images}


def model_inputs(batch: dict) -> dict:
    """A batch as the model's forward takes it: cached image features go in through `mm_encoder_outputs`,
    which both families accept in place of pixels."""
    inputs = dict(batch)
    features = inputs.pop("image_features", None)
    if features is not None:
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return inputs


def cache_vision_features(model, family, data: list, batch_size: int, device: str, dtype: torch.dtype,
                          show: bool, rank: distributed.Dist = distributed.Dist()) -> None:
    """Compute every page's image features once and keep them in place of its pixels.

    With LoRA on the language model only, the vision towers are frozen and dropout-free, so a page's features
    are the same at every step: computing them per step spent more than half of each step on them (H200,
    batch 4: 188 of 347 ms). A page's features (1121 x 1280 in bf16, 2.9 MB) also take a tenth of the memory
    of its pixels. Under DDP each process computes its share of the pages and the processes exchange them,
    a round at a time, since every process trains on every page over the epochs.
    """
    base = model.get_base_model()
    was_training = base.training
    base.eval()
    bar = tqdm(total=len(data), desc="vision features", unit="page", disable=not show)
    per_round = batch_size * rank.world_size
    with torch.no_grad():
        for start in range(0, len(data), per_round):
            mine = list(range(start + rank.rank * batch_size, min(start + (rank.rank + 1) * batch_size, len(data))))
            features = []
            if mine:
                views = to_device(family.collate_pixels([data[i].pixel for i in mine]), device, dtype)
                features = [f.to("cpu") for f in base.get_image_features(**views, return_dict=True).pooler_output]
            shares = [list(zip(mine, features))]
            if rank.enabled:
                shares = [None] * rank.world_size
                torch.distributed.all_gather_object(shares, list(zip(mine, features)))
            for i, f in (pair for share in shares for pair in share):
                data[i].features, data[i].pixel = f, {}
            bar.update(min(per_round, len(data) - start))
    bar.close()
    base.train(was_training)


def batch_loss(model, batch: dict, targets_only: bool, head: torch.nn.Module | None = None,
               chunk: int = 0) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens.

    targets_only (batches left-padded, so every target sits at the end): the language-model head runs over
    the last positions that hold targets only, not over the image and prompt tokens before them. On a full
    page that is about half the positions, and the logits (positions x 129k vocabulary) are the largest
    activation of the step.
    head (the model's LM head, taken out by `detach_lm_head`, so the model returns hidden states): the head
    and loss run `chunk` positions at a time (`chunked_cross_entropy`).
    """
    if not targets_only:
        return model(**model_inputs(batch)).loss
    labels = batch["labels"]
    keep = int((labels != -100).sum(1).max()) + 1
    out = model(**model_inputs({k: v for k, v in batch.items() if k != "labels"}), logits_to_keep=keep).logits
    out, targets = out[:, :-1].flatten(0, 1), labels[:, -keep + 1:].flatten()
    if head is not None:
        return chunked_cross_entropy(out, head, targets, chunk)
    return torch.nn.functional.cross_entropy(out.float(), targets, ignore_index=-100)


def chunked_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor,
                          chunk: int) -> torch.Tensor:
    """Mean cross-entropy of `head(hidden)` against `labels`, `chunk` rows at a time, each chunk's logits
    recomputed in the backward pass.

    Why: at batch 16 the logits of 16,000 target positions over a 129k vocabulary are 4 GB in bf16, and the
    float32 copy, log-softmax and its gradient three times that: the step's largest allocations. A chunk's
    logits live only while its loss is taken; the price is one more LM-head matmul per chunk in the
    backward pass. (Liger's fused linear cross-entropy does this in Triton, GPU only; this runs anywhere.)
    """
    total = hidden.new_zeros((), dtype=torch.float32)
    chunk = chunk or hidden.shape[0]
    for start in range(0, hidden.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _summed_cross_entropy, hidden[start:start + chunk], head, labels[start:start + chunk],
            use_reentrant=False)
    return total / (labels != -100).sum()


def _summed_cross_entropy(hidden, head, labels):
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def detach_lm_head(model) -> torch.nn.Module:
    """Take the LM head out of a (PEFT-wrapped) model, leaving an identity in its place, so the model's
    `logits` are its last hidden states; `attach_lm_head` puts it back."""
    base = model.get_base_model()
    head, base.lm_head = base.lm_head, torch.nn.Identity()
    return head


def attach_lm_head(model, head: torch.nn.Module) -> None:
    model.get_base_model().lm_head = head


@contextlib.contextmanager
def lm_head_outside(model, enabled: bool):
    """`detach_lm_head` for the duration of the block (yields the head, or None when not enabled)."""
    head = detach_lm_head(model) if enabled else None
    try:
        yield head
    finally:
        if head is not None:
            attach_lm_head(model, head)


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    """Move tensors (alone or in lists) to the device; floating ones (pixels, features) in the model's dtype,
    cast before the copy."""
    def move(v):
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        return v
    return {k: move(v) for k, v in batch.items()}


def prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Produce the next items in a background thread while the GPU works on the current one.

    Batching full pages means concatenating and copying ~30 MB of pixels per page; done inline, the GPU
    waits for it every step. torch releases the GIL in those ops, so a thread is enough (no worker processes).
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in items:
                q.put(item)
        except BaseException as e:  # re-raised in the training loop
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def step_plan(n_pages: int, batch_size: int, grad_accum: int, steps: int, seed: int) -> list[list[list[int]]]:
    """Every step's micro-batches of page indices, drawn up front with the same seed on every rank, so all ranks
    agree and a resumed run continues the same sequence. Pages are shuffled once per epoch and epochs follow each
    other without a gap, so every micro-batch holds `batch_size` pages, even when the dataset has fewer pages
    than a batch (a page then appears twice in it)."""
    rng = random.Random(seed)
    order: list[int] = []
    plan: list[list[list[int]]] = []
    for _ in range(steps):
        plan.append([])
        for _ in range(grad_accum):
            while len(order) < batch_size:
                order += rng.sample(range(n_pages), n_pages)
            plan[-1].append(order[:batch_size])
            order = order[batch_size:]
    return plan


def train(params: Params, train_jsonl: str | Path, tracker: Tracker | None = None,
          metrics_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    tp = params.train
    tracker = tracker or Tracker(None)
    seed_everything(tp.seed)
    rank, device = distributed.setup(pick_device(tp.device))  # one process per GPU under torchrun
    dtype = pick_dtype(tp.dtype, device.split(":")[0])

    family, model, processor, base_path = load_base(params, device, dtype)
    model = attach_lora_from_params(model, family, params.lora)
    if tp.gradient_checkpointing:
        enable_checkpointing(model, tp.gradient_checkpointing)
    if (scope := compile_scope(params, device)) != "none":
        compile_layers(model, scope)
    n_trainable = trainable_parameters(model)
    peft_model = model
    if rank.enabled:
        model = DistributedDataParallel(model, device_ids=[rank.local_rank] if device.startswith("cuda") else None)

    examples = read_jsonl(train_jsonl)
    if not examples:
        raise ValueError(f"{train_jsonl} has no examples: nothing to train on")
    data = [family.encode_example(processor, load_image(e.image), e.prompt, e.target, tp.max_label_tokens)
            for e in tqdm(examples, desc="encode", unit="page", disable=not (progress and rank.is_main))]
    cut = [x.label_tokens for x in data if x.label_tokens > tp.max_label_tokens]
    if cut and rank.is_main:
        print(f"note: {len(cut)} of {len(data)} labels are longer than train.max_label_tokens="
              f"{tp.max_label_tokens} (the longest {max(cut)} tokens): they are trained on their first "
              f"{tp.max_label_tokens} tokens, without an end of text. Raise train.max_label_tokens to train on "
              "whole pages.", flush=True)
    for x in data:  # pixels kept in the model's dtype: half the memory and copying in bf16
        x.pixel = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                   for k, v in x.pixel.items()}
    vision_feature_seconds = time.time()
    if tp.cache_vision_features and params.lora.mode == "llm":
        cache_vision_features(peft_model, family, data, max(1, tp.batch_size // rank.world_size), device, dtype,
                              progress and rank.is_main, rank)
    vision_feature_seconds = time.time() - vision_feature_seconds
    # Tokens the loss is taken over (labels are shifted by one inside the model).
    target_tokens = [int((x.labels[1:] != -100).sum()) for x in data]

    steps_per_epoch = math.ceil(len(data) / (tp.batch_size * tp.grad_accum))
    total_steps = tp.max_steps or tp.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tp.learning_rate,
                                  weight_decay=tp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tp.warmup_steps) if tp.warmup_steps else 1.0)
    tracker.set_tags({"family": params.model.family, "base": params.model.base, "lora_mode": params.lora.mode,
                      "base_revision": checkpoint_source(base_path).get("revision"), "device": device,
                      "num_gpus": rank.world_size, **{f"version.{k}": v for k, v in versions().items()}})
    tracker.log_metrics({"trainable_params": n_trainable, "train_pages": len(data), "labels_cut": len(cut)})

    plan = step_plan(len(data), tp.batch_size, tp.grad_accum, total_steps, tp.seed)

    checkpoints = Checkpoints(tp.checkpoint_dir, fingerprint(params, train_jsonl))
    state = checkpoints.load() if tp.resume != "never" else None
    if state is None and tp.resume == "require":
        raise FileNotFoundError(f"train.resume=require but {checkpoints.path} does not exist (no checkpoint of a "
                                f"run with these params and data)")
    first_step, losses = 0, []
    if state is not None:
        Checkpoints.restore(state, peft_model, optimizer, schedule)
        first_step, losses = state["step"], list(state["losses"])
        if rank.is_main:
            print(f"resuming from step {first_step} of {total_steps} ({checkpoints.path})", flush=True)

    def batches():  # this process's tensors for each remaining step
        for micro_batches in plan[first_step:]:
            yield micro_batches, [
                to_device(pad_batch([data[i] for i in mb[rank.rank::rank.world_size]],
                                    processor.tokenizer.pad_token_id, family, left=tp.logits_on_targets),
                          device, dtype)
                for mb in micro_batches]

    step_ends: list[float] = []
    model.train()
    start = time.time()
    # chunked loss: the LM head runs outside the model during the steps, and is back before saving
    with lm_head_outside(peft_model, tp.logits_on_targets and tp.loss_chunk > 0) as head:
        bar = tqdm(prefetch(batches()), initial=first_step, total=total_steps, desc="train", unit="step",
                   disable=not (progress and rank.is_main))
        for step, (micro_batches, tensors) in enumerate(bar, start=first_step):
            # The step's loss is the mean over every target token of the global batch, as on one GPU. Each
            # process weights its share by its token count; DDP averages gradients over processes, so the
            # world-size factor turns that average back into the sum of the shares.
            step_tokens = sum(target_tokens[i] for mb in micro_batches for i in mb)
            step_loss = 0.0
            for k, (mb, batch) in enumerate(zip(micro_batches, tensors)):
                share = sum(target_tokens[i] for i in mb[rank.rank::rank.world_size]) / step_tokens
                sync = k == len(micro_batches) - 1 or not rank.enabled  # all-reduce gradients once per step
                with contextlib.nullcontext() if sync else model.no_sync():
                    loss = batch_loss(model, batch, tp.logits_on_targets, head, tp.loss_chunk) * share
                    (loss * rank.world_size).backward()
                step_loss += loss.item()
            step_loss = distributed.sum_across(step_loss, rank, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(step_loss)
            step_ends.append(time.time())  # loss.item() above waited for the GPU: these are real step times
            if step == first_step:
                distributed.check_replicas_identical(peft_model, rank)
            if tp.save_every and (step + 1) % tp.save_every == 0 and step + 1 < total_steps and rank.is_main:
                checkpoints.save(step + 1, losses, peft_model, optimizer, schedule)
            bar.set_postfix(loss=f"{step_loss:.4f}")
            if step % tp.log_every == 0 or step == total_steps - 1:
                tracker.log_metric("train_loss", step_loss, step=step)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.time() - start
    distributed.check_replicas_identical(peft_model, rank)

    out = Path(tp.output_dir)
    result = TrainResult(out, total_steps, losses, n_trainable, seconds,
                         steady_pages_per_second(start, step_ends, tp.batch_size * tp.grad_accum), rank.world_size,
                         peak_memory_gib(device), vision_feature_seconds=vision_feature_seconds, model=peft_model)
    if rank.is_main:  # one writer: every rank holds the same adapter
        checkpoints.clear()  # finished: a rerun trains afresh
        out.mkdir(parents=True, exist_ok=True)
        peft_model.save_pretrained(out)
        write_json(out / RUN_INFO, {
            "family": params.model.family, "base": params.model.base, "base_path": str(base_path),
            "base_source": checkpoint_source(base_path),
            "resolution": params.model.resolution, "lora": params.lora.model_dump(),
            "prompt": examples[0].prompt, "trainable_params": n_trainable,
            "lora_modules": len(lora_modules(peft_model)), "steps": total_steps, "num_gpus": rank.world_size,
            "mlflow_run_id": tracker.run_id, "versions": versions(),
        })
        if metrics_dir is not None:
            write_train_metrics(result, len(data), Path(metrics_dir))
        tracker.log_metrics({"final_loss": final_loss(losses), "last_loss": losses[-1], "train_seconds": seconds,
                             "vision_feature_seconds": vision_feature_seconds,
                             "pages_per_second": result.pages_per_second})
        tracker.log_artifacts(out, artifact_path="adapter")
    del model  # the DDP wrapper (its reducer holds the process group) goes before the group does
    distributed.teardown()
    return result


def steady_pages_per_second(start: float, step_ends: list[float], pages_per_step: int) -> float:
    """Throughput after the first steps (CUDA start-up, kernel autotuning); over all steps when few."""
    warm = min(3, len(step_ends) // 3)
    if len(step_ends) - 1 - warm < 1:
        return pages_per_step * len(step_ends) / max(step_ends[-1] - start, 1e-9)
    return pages_per_step * (len(step_ends) - 1 - warm) / (step_ends[-1] - step_ends[warm])


def peak_memory_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def final_loss(losses: list[float]) -> float:
    """The mean loss of the last tenth of the steps: one step's loss depends on which pages it drew."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def write_train_metrics(result: TrainResult, pages: int, metrics_dir: Path) -> None:
    metrics_dir.mkdir(parents=True, exist_ok=True)
    write_json(metrics_dir / "train.json", {
        "trainable_params": result.trainable_params, "steps": result.steps, "pages": pages,
        "first_loss": round(result.losses[0], 4), "final_loss": round(final_loss(result.losses), 4),
        "last_loss": round(result.losses[-1], 4),
        "seconds": round(result.seconds, 1), "pages_per_second": round(result.pages_per_second, 3),
        "num_gpus": result.num_gpus, "peak_memory_gib": result.peak_memory_gib,
    })
    with (metrics_dir / "train_loss.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"])
        w.writerows([i, round(v, 5)] for i, v in enumerate(result.losses))


def versions() -> dict:
    import peft
    import transformers

    return {"ocr_finetune": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def adapter_params(params: Params, adapter_dir: str | Path) -> Params:
    """params with the family, base and resolution an adapter was trained with: train and infer must agree on
    them, or the adapter sees other inputs (or another model). Says so when params.yaml differs."""
    info = read_run_info(adapter_dir)
    keys = ("family", "base", "resolution")
    trained = {k: info.get(k, getattr(params.model, k)) for k in keys}
    if not info or all(trained[k] == getattr(params.model, k) for k in keys):
        return params
    print(f"note: {adapter_dir} was trained on " + ", ".join(f"model.{k}={v}" for k, v in trained.items())
          + "; using those, not params.yaml's", flush=True)
    return params.with_model(**trained)


def read_run_info(adapter_dir: str | Path) -> dict:
    path = Path(adapter_dir) / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
