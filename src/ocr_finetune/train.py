"""LoRA fine-tuning, in one loop you can read top to bottom.

    setup: model + LoRA, optimizer, dataset file, step plan (resumed from a checkpoint when interrupted)
    loop:  (micro-batches from the loader's workers -> forward, backward) -> optimizer step, x steps
    save:  adapter + what it was trained from + metrics

Model loading lives in `loading`, the data path (workers, batches, the step plan) in `data`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from transformers.modeling_layers import GradientCheckpointingLayer

from . import __version__, distributed
from .checkpoint import Checkpoints, fingerprint
from .compiled import compile_layers
from .data import (TrainPages, WaitClock, default_workers, model_inputs, step_plan, to_device,
                   train_batches)
from .dataset import JsonlPages
from .feature_cache import FeatureCache, model_key
from .loading import RUN_INFO, load_base
from .lora import attach_lora_from_params, lora_modules, save_adapter, trainable_parameters
from .models.base import checkpoint_source, write_json
from .params import Params
from .runtime import pick_device, pick_dtype, seed_everything
from .tracking import Tracker


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int
    losses: list[float]
    trainable_params: int
    seconds: float  # the loop: from the first batch asked for to the last step (setup_seconds before it)
    pages_per_second: float = 0.0  # steady: after the first steps
    num_gpus: int = 1
    peak_memory_gib: float | None = None  # this process's GPU, None on CPU
    model: object = field(default=None, repr=False)  # the trained PEFT model, still in memory
    setup_seconds: float = 0.0  # model load, adapters, compile set-up, dataset index, resume
    whole_pages_per_second: float = 0.0  # pages trained over the whole loop, first batches and waits included
    data_wait_fraction: float = 0.0
    features_computed: int = 0
    features_read: int = 0
    labels_cut: int = 0


# Compiling the language model's layers costs about 40 s at the first steps of a run (H200, mode llm, batch 8:
# a 2,000-page epoch from cached features took 74.9 s where its steady rate needs 37 s,
# benchmarks/results/streaming_h200.json) and saves 1/29.6 - 1/49.1 s a page (H100: 29.6 -> 49.1 pages/s):
# even at about 3,000 pages; a run with a third of the pages' features still to compute gains less per page.
LLM_COMPILE_MIN_PAGES = 6000


def compile_scope(params: Params, device: str, pages: int | None = None) -> str:
    """train.compile resolved. `auto` on CUDA compiles
    - the language model's layers, except with LoRA on the routed experts (PEFT rebuilds their parametrized
      class at every forward, so the layer would recompile every step) or a 4-bit base (not measured), and
      except in mode llm with cached features when the run trains fewer than LLM_COMPILE_MIN_PAGES pages
      (`pages`: pages x epochs), where compiling takes longer than it saves;
    - the vision towers' layers, except when they run once per page only (mode llm with cached features:
      compiling them takes longer than that one pass on a dataset under about a thousand pages).
    `auto` on CPU compiles nothing: it costs more there than it saves."""
    if params.train.compile != "auto":
        return params.train.compile
    if not device.startswith("cuda"):
        return "none"
    cached = params.lora.mode == "llm" and params.train.cache_vision_features
    short = cached and pages is not None and pages < LLM_COMPILE_MIN_PAGES
    llm = not (params.lora.experts or params.model.load_in_4bit or short)
    vision = not cached
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


def batch_loss(model, batch: dict, targets_only: bool, head: torch.nn.Module | None = None,
               chunk: int = 0) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (summed_batch_loss says how)."""
    total, tokens = summed_batch_loss(model, batch, targets_only, head, chunk)
    return total / tokens


def summed_batch_loss(model, batch: dict, targets_only: bool, head: torch.nn.Module | None = None,
                      chunk: int = 0) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's target tokens, their number).

    Summed, so that a step's loss is the mean over every target token of its micro-batches and GPUs whatever
    their share: the loop divides by the step's token count once it is known (`run_step`).
    targets_only (batches left-padded, so every target sits at the end): the language-model head runs over
    the last positions that hold targets only, not over the image and prompt tokens before them. On a full
    page that is about half the positions, and the logits (positions x 129k vocabulary) are the largest
    activation of the step.
    head (the model's LM head, taken out by `detach_lm_head`, so the model returns hidden states): the head
    and loss run `chunk` positions at a time (`chunked_cross_entropy`).
    """
    labels = batch["labels"]
    tokens = int((labels[:, 1:] != -100).sum())  # labels are shifted by one inside the model
    if not targets_only:
        return model(**model_inputs(batch)).loss * tokens, tokens
    keep = int((labels != -100).sum(1).max()) + 1
    out = model(**model_inputs({k: v for k, v in batch.items() if k != "labels"}), logits_to_keep=keep).logits
    out, targets = out[:, :-1].flatten(0, 1), labels[:, -keep + 1:].flatten()
    if head is not None:
        return chunked_cross_entropy(out, head, targets, chunk) * tokens, tokens
    return torch.nn.functional.cross_entropy(out.float(), targets, ignore_index=-100, reduction="sum"), tokens


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


@dataclass
class Run:
    """Everything the loop needs, made by `setup`: the model, its optimizer, the data and the plan."""
    params: Params
    rank: distributed.Dist
    device: str
    dtype: torch.dtype
    family: object
    model: torch.nn.Module  # the PEFT model, or its DDP wrapper
    peft_model: object
    base_path: Path
    n_trainable: int
    dataset: TrainPages
    plan: list
    first_step: int
    losses: list
    optimizer: torch.optim.Optimizer
    schedule: object
    checkpoints: Checkpoints
    tracker: Tracker
    setup_seconds: float
    prompt: str


@dataclass
class LoopStats:
    seconds: float = 0.0  # from the first batch asked for to the last step's end
    step_ends: list = field(default_factory=list)
    data_wait_fraction: float = 0.0  # share of the loop spent waiting for the next batch
    features_computed: int = 0  # pages whose image features the loop computed (and stored in the cache)
    features_read: int = 0  # pages whose image features came from the cache
    labels_cut: dict = field(default_factory=dict)  # page index -> label tokens, for labels past max_label_tokens


def train(params: Params, train_jsonl: str | Path, tracker: Tracker | None = None,
          metrics_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """setup -> loop -> save."""
    run = setup(params, train_jsonl, tracker or Tracker(None))
    stats = loop(run, progress)
    return save(run, stats, metrics_dir)


def setup(params: Params, train_jsonl: str | Path, tracker: Tracker) -> Run:
    """The model with its adapters, optimizer and schedule, the dataset and step plan; restored from the last
    checkpoint when the run was interrupted."""
    t0 = time.time()
    tp = params.train
    seed_everything(tp.seed)
    rank, device = distributed.setup(pick_device(tp.device))  # one process per GPU under torchrun
    dtype = pick_dtype(tp.dtype, device.split(":")[0])

    records = JsonlPages(train_jsonl)
    if not len(records):
        raise ValueError(f"{train_jsonl} has no examples: nothing to train on")
    steps_per_epoch = math.ceil(len(records) / (tp.batch_size * tp.grad_accum))
    total_steps = tp.max_steps or tp.epochs * steps_per_epoch

    family, model, processor, base_path = load_base(params, device, dtype)
    # again: loading may have drawn random numbers (weights a checkpoint lacks, a tiny model built on first
    # use), and the adapter's initial weights must depend on the seed alone, not on what is on disk
    seed_everything(tp.seed)
    model = attach_lora_from_params(model, family, params.lora)
    if tp.gradient_checkpointing:
        enable_checkpointing(model, tp.gradient_checkpointing)
    if (scope := compile_scope(params, device, total_steps * tp.batch_size * tp.grad_accum)) != "none":
        compile_layers(model, scope)
    n_trainable = trainable_parameters(model)
    peft_model = model
    if rank.enabled:
        model = DistributedDataParallel(model, device_ids=[rank.local_rank] if device.startswith("cuda") else None)

    cache = None
    if tp.cache_vision_features and params.lora.mode == "llm" and tp.feature_cache_gib > 0:
        cache = FeatureCache(tp.feature_cache_dir, model_key(params, base_path, dtype),
                             int(tp.feature_cache_gib * 2**30))
        if rank.is_main:
            cache.trim()
    dataset = TrainPages(records, family, processor, dtype, tp.max_label_tokens, cache)

    plan = step_plan(len(records), tp.batch_size, tp.grad_accum, total_steps, tp.seed,
                     lengths=records.target_chars if tp.group_by_length else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tp.learning_rate,
                                  weight_decay=tp.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / tp.warmup_steps) if tp.warmup_steps else 1.0)
    tracker.set_tags({"family": params.model.family, "base": params.model.base, "lora_mode": params.lora.mode,
                      "base_revision": checkpoint_source(base_path).get("revision"), "device": device,
                      "num_gpus": rank.world_size, **{f"version.{k}": v for k, v in versions().items()}})
    tracker.log_metrics({"trainable_params": n_trainable, "train_pages": len(records)})

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
    return Run(params, rank, device, dtype, family, model, peft_model, base_path, n_trainable, dataset, plan,
               first_step, losses, optimizer, schedule, checkpoints, tracker, time.time() - t0, records[0].prompt)


def loop(run: Run, progress: bool = True) -> LoopStats:
    """The steps of the plan from `run.first_step`: for each micro-batch forward and backward, for each step
    the optimizer; checkpoints every `train.save_every` steps."""
    tp, rank, stats = run.params.train, run.rank, LoopStats()
    batches = train_batches(run.dataset, run.plan[run.first_step:], rank.rank, rank.world_size,
                            run.dataset.processor.tokenizer.pad_token_id, tp.logits_on_targets,
                            default_workers(tp.num_workers, _ranks_per_host(rank)), run.device.startswith("cuda"),
                            tp.prefetch)
    pages_per_step = tp.batch_size * tp.grad_accum
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    writes = FeatureWrites(run.dataset.cache)
    run.model.train()
    clock = WaitClock()
    step = run.first_step
    step_loss, step_tokens = None, 0
    # The summed loss is divided by a bound on a step's target tokens before backward (the same on every rank,
    # so DDP's average stays exact) and the gradients by the real count after (finish_step): gradients keep
    # the size of a mean loss's, not thousands of times it, in bf16.
    loss_scale = float(pages_per_step * (tp.max_label_tokens + 1))
    # chunked loss: the LM head runs outside the model during the steps, and is back before saving
    with lm_head_outside(run.peft_model, tp.logits_on_targets and tp.loss_chunk > 0) as head:
        bar = tqdm(initial=run.first_step, total=len(run.plan), desc="train", unit="step",
                   disable=not (progress and rank.is_main))
        for mb in clock.iterate(batches):
            tensors = to_device(mb.tensors, run.device, run.dtype)
            if "image_features" in tensors:
                read, computed = fill_image_features(run.peft_model, tensors, mb.pages, writes)
                stats.features_read += read
                stats.features_computed += computed
            for x in mb.pages:
                if x.label_tokens > tp.max_label_tokens:
                    stats.labels_cut[x.index] = x.label_tokens
            # gradients all-reduced once per step, at its last micro-batch
            with contextlib.nullcontext() if mb.last_of_step or not rank.enabled else run.model.no_sync():
                loss, tokens = summed_batch_loss(run.model, tensors, tp.logits_on_targets, head, tp.loss_chunk)
                (loss * (rank.world_size / loss_scale)).backward()
            step_loss = loss.detach().double() + (0 if step_loss is None else step_loss)  # on the GPU: no wait
            step_tokens += tokens
            if not mb.last_of_step:
                continue
            run.losses.append(finish_step(run, trainable, float(step_loss), step_tokens, loss_scale))
            step_loss, step_tokens = None, 0
            stats.step_ends.append(time.time())  # the loss above waited for the GPU: these are real step times
            if step == run.first_step:
                distributed.check_replicas_identical(run.peft_model, rank)
            if tp.save_every and (step + 1) % tp.save_every == 0 and step + 1 < len(run.plan) and rank.is_main:
                run.checkpoints.save(step + 1, run.losses, run.peft_model, run.optimizer, run.schedule)
            bar.update(1)
            bar.set_postfix(loss=f"{run.losses[-1]:.4f}", pages_s=f"{pages_per_step / _last_step_seconds(stats, clock):.1f}",
                            data_wait=f"{clock.fraction:.0%}")
            if step % tp.log_every == 0 or step == len(run.plan) - 1:
                run.tracker.log_metric("train_loss", run.losses[-1], step=step)
            step += 1
        bar.close()
    writes.wait()
    if run.device.startswith("cuda"):
        torch.cuda.synchronize()
    stats.seconds = time.perf_counter() - clock.start
    stats.data_wait_fraction = clock.fraction
    return stats


def _last_step_seconds(stats: LoopStats, clock: WaitClock) -> float:
    ends = stats.step_ends
    return max(ends[-1] - ends[-2], 1e-9) if len(ends) > 1 else max(time.perf_counter() - clock.start, 1e-9)


def _ranks_per_host(rank: distributed.Dist) -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", rank.world_size))


def finish_step(run: Run, trainable: list, loss_sum: float, tokens: int, loss_scale: float) -> float:
    """The optimizer step once every micro-batch of the step is through backward; returns the step's loss.

    Each process summed its tokens' losses and backpropagated them times world_size / loss_scale; DDP averaged
    the gradients over processes. So loss_scale over the step's token count (summed over processes) turns them
    into the gradient of the mean over every target token of the global batch, as on one GPU."""
    loss_sum, tokens = distributed.sum_across([loss_sum, float(tokens)], run.rank, run.device)
    tokens = max(tokens, 1.0)
    with torch.no_grad():
        for p in trainable:
            if p.grad is not None:
                p.grad.mul_(loss_scale / tokens)
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    run.optimizer.step()
    run.schedule.step()
    run.optimizer.zero_grad(set_to_none=True)
    return loss_sum / tokens


class FeatureWrites:
    """Cache writes in a thread, so the GPU does not wait for the disk; a few in flight at most."""

    def __init__(self, cache: FeatureCache | None, in_flight: int = 64):
        self.cache, self.in_flight = cache, in_flight
        self.pool = ThreadPoolExecutor(1) if cache is not None else None
        self.pending: list = []

    def put(self, key: str, features: torch.Tensor, image_tokens: int) -> None:
        if self.cache is None:
            return
        ready = None
        if features.is_cuda:  # copied without stopping the loop; the writer waits for the copy
            host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
            host.copy_(features, non_blocking=True)
            features, ready = host, torch.cuda.Event()
            ready.record()
        self.pending.append(self.pool.submit(self._write, key, features, image_tokens, ready))
        while len(self.pending) > self.in_flight:
            self.pending.pop(0).result()

    def _write(self, key, features, image_tokens, ready) -> None:
        if ready is not None:
            ready.synchronize()
        self.cache.put(key, features, image_tokens)

    def wait(self) -> None:
        for f in self.pending:
            f.result()
        self.pending = []
        if self.pool is not None:
            self.pool.shutdown()


def image_features(model, pixels: dict) -> list[torch.Tensor]:
    """The frozen vision towers' features of a batch of pages (one tensor per page), as the model computes
    them inside its forward."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad():
            return list(base.get_image_features(**pixels, return_dict=True).pooler_output)
    finally:
        base.train(was_training)


def fill_image_features(model, tensors: dict, pages: list, writes: FeatureWrites) -> tuple[int, int]:
    """Mode llm with the feature cache: compute the features of the batch's pages the cache did not hold (in
    place of `missing_pixels`) and store them. Returns (pages read from the cache, pages computed).

    One page at a time: what the cache keeps serves every later step and run, so it must be the page's own
    features, not those of the page in the company of its first batch (on a GPU the kernels, and so the last
    bits, change with the batch size and shapes; the model learns from these bits when pages look alike).
    Only the first epoch pays (a page's views, its tiles included, still go through the towers together); a
    page twice in one batch is computed once."""
    features = tensors["image_features"]
    missing = [j for j, f in enumerate(features) if f is None]
    computed: dict = {}  # cache key -> features
    for j, page_pixels in zip(missing, tensors.pop("missing_pixels", None) or []):
        key = pages[j].cache_key
        if key not in computed:
            computed[key] = image_features(model, page_pixels)[0]
            writes.put(key, computed[key], pages[j].image_tokens)
        features[j] = computed[key]
    return len(features) - len(missing), len(missing)


def save(run: Run, stats: LoopStats, metrics_dir: str | Path | None) -> TrainResult:
    """The adapter, what it was trained from, and the run's metrics (rank 0: every rank holds the same)."""
    tp, rank = run.params.train, run.rank
    distributed.check_replicas_identical(run.peft_model, rank)
    cut = distributed.merge_across(stats.labels_cut, rank)
    stats.features_computed, stats.features_read = (
        int(v) for v in distributed.sum_across([float(stats.features_computed), float(stats.features_read)],
                                               rank, run.device))
    steps = len(run.plan)
    pages_per_step = tp.batch_size * tp.grad_accum
    out = Path(tp.output_dir)
    result = TrainResult(out, steps, run.losses, run.n_trainable, stats.seconds,
                         steady_pages_per_second(stats.seconds, stats.step_ends, pages_per_step), rank.world_size,
                         peak_memory_gib(run.device), model=run.peft_model, setup_seconds=run.setup_seconds,
                         whole_pages_per_second=pages_per_step * (steps - run.first_step) / max(stats.seconds, 1e-9),
                         data_wait_fraction=stats.data_wait_fraction, features_computed=stats.features_computed,
                         features_read=stats.features_read, labels_cut=len(cut))
    if rank.is_main:  # one writer: every rank holds the same adapter
        if cut:
            print(f"note: {len(cut)} labels are longer than train.max_label_tokens={tp.max_label_tokens} (the "
                  f"longest {max(cut.values())} tokens): they were trained on their first {tp.max_label_tokens} "
                  "tokens, without an end of text. Raise train.max_label_tokens to train on whole pages.", flush=True)
        run.checkpoints.clear()  # finished: a rerun trains afresh
        out.mkdir(parents=True, exist_ok=True)
        save_adapter(run.peft_model, out)
        params = run.params
        write_json(out / RUN_INFO, {
            "family": params.model.family, "base": params.model.base, "base_path": str(run.base_path),
            "base_source": checkpoint_source(run.base_path),
            "resolution": params.model.resolution, "lora": params.lora.model_dump(),
            "prompt": run.prompt, "trainable_params": run.n_trainable,
            "lora_modules": len(lora_modules(run.peft_model)), "steps": steps, "num_gpus": rank.world_size,
            "mlflow_run_id": run.tracker.run_id, "versions": versions(),
        })
        if metrics_dir is not None:
            write_train_metrics(result, len(run.dataset), Path(metrics_dir))
        run.tracker.log_metrics({"final_loss": final_loss(run.losses), "first_loss": run.losses[0],
                                 "steps": steps, "last_loss": run.losses[-1],
                                 "train_seconds": stats.seconds, "pages_per_second": result.pages_per_second,
                                 "whole_pages_per_second": result.whole_pages_per_second,
                                 "data_wait_fraction": stats.data_wait_fraction, "labels_cut": len(cut),
                                 "features_computed": stats.features_computed,
                                 "features_read": stats.features_read})
        run.tracker.log_artifacts(out, artifact_path="adapter")
    del run.model  # the DDP wrapper (its reducer holds the process group) goes before the group does
    distributed.teardown()
    return result


def steady_pages_per_second(seconds: float, step_ends: list[float], pages_per_step: int) -> float:
    """Throughput after the first steps (CUDA start-up, kernel autotuning); over the whole loop when few."""
    warm = min(3, len(step_ends) // 3)
    if len(step_ends) - 1 - warm < 1:
        return pages_per_step * len(step_ends) / max(seconds, 1e-9)
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
    # What people compare across experiments, under the names MLflow has them (`dvc exp show`, `dvc metrics
    # diff`); the timings, which change on every run, beside it as a plain file (and in MLflow).
    write_json(metrics_dir / "train.json", {
        "trainable_params": result.trainable_params, "steps": result.steps, "train_pages": pages,
        "first_loss": round(result.losses[0], 4), "final_loss": round(final_loss(result.losses), 4),
    })
    write_json(metrics_dir / "train_speed.json", {
        "train_seconds": round(result.seconds, 1), "pages_per_second": round(result.pages_per_second, 3),
        "whole_pages_per_second": round(result.whole_pages_per_second, 3),
        "data_wait_fraction": round(result.data_wait_fraction, 4), "num_gpus": result.num_gpus,
        "peak_memory_gib": result.peak_memory_gib, "last_loss": round(result.losses[-1], 4),
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


