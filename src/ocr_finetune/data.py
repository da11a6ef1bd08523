"""The data path: pages from disk to tensors on the GPU, prepared in worker processes while the GPU works.

    dataset file (byte offsets) -> workers: read image, run the processor, tokenise (or read cached
    features) -> a thread: pad into batches, pin -> the loop: copy to the GPU without blocking

Nothing per page is kept beyond the batches in flight: a corpus of 200,000 pages costs what one of 40 does
(the record offsets aside, 8 bytes a page). Workers take pages one at a time, not whole batches, so the pages
in flight are `workers x prefetch` rather than that many batches, and a slow page delays one page's slot.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .dataset import JsonlPages
from .models.base import Encoded, load_image


def default_workers(requested: int | str, processes_per_host: int = 1) -> int:
    """`auto`: every core this process may use but one (the loop's own), shared among the processes on this
    host (DDP ranks); 0 prepares pages in the loop's process."""
    if requested != "auto":
        return int(requested)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(32, cores // max(1, processes_per_host) - 1))


def _worker_init(_):
    torch.set_num_threads(1)  # one core per worker; the processor's numpy and torch ops would spread otherwise


def _identity(x):
    return x


def page_loader(dataset: Dataset, order: Iterable[int], workers: int, prefetch: int = 4) -> Iterator:
    """dataset[i] for i in order, prepared `workers` at a time in worker processes, in order."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers inherit a used Rust tokenizer
    order = list(order)
    if not order:
        return iter(())
    extra = {"prefetch_factor": prefetch, "worker_init_fn": _worker_init} if workers else {}
    # its own generator: the loader draws its workers' seed when iterated, and from torch's global generator
    # that draw would shift dropout's random numbers in a resumed run (it starts the loader at another step)
    return iter(DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers, collate_fn=_identity,
                           generator=torch.Generator().manual_seed(0), **extra))


class WaitClock:
    """The share of a loop's time spent waiting for its data (`data_wait_fraction`)."""

    def __init__(self):
        self.start, self.waited = time.perf_counter(), 0.0
        self.first_wait: float | None = None  # the wait for the first item: workers starting, the first batch

    def wait_for(self, items: Iterator):
        t = time.perf_counter()
        item = next(items)
        waited = time.perf_counter() - t
        self.waited += waited
        if self.first_wait is None:
            self.first_wait = waited
        return item

    def iterate(self, items: Iterable) -> Iterator:
        items = iter(items)
        while True:
            try:
                yield self.wait_for(items)
            except StopIteration:
                return

    @property
    def fraction(self) -> float:
        return self.waited / max(time.perf_counter() - self.start, 1e-9)


def background(items: Iterator, depth: int = 2) -> Iterator:
    """Produce the next items in a thread while the caller works on the current one (torch releases the GIL
    in the concatenation and pinning a batch costs)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def work():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the consumer stopped early (an error, Ctrl-C): the thread ends instead of blocking


def pin(batch, enabled: bool):
    """Page-locked copies of a batch's tensors, so the copy to the GPU runs without blocking the loop."""
    if not enabled or batch is None:
        return batch
    if isinstance(batch, dict):
        return {k: pin(v, True) for k, v in batch.items()}
    if isinstance(batch, list):
        return [pin(v, True) for v in batch]
    return batch.pin_memory() if isinstance(batch, torch.Tensor) else batch


def to_device(batch: dict, device: str, dtype: torch.dtype) -> dict:
    """Move tensors (alone or in lists) to the device; floating ones (pixels, features) in the model's dtype,
    cast before the copy. Pinned tensors are copied without blocking."""
    def move(v):
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, torch.Tensor):
            return v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype,
                        non_blocking=v.is_pinned())
        return v
    return {k: move(v) for k, v in batch.items()}


# ---------------------------------------------------------------- training

class TrainPages(Dataset):
    """Training examples, encoded when asked for (in a worker): record i of the dataset file, its image through
    the processor, or, when the feature cache holds the page, its cached features and no pixels at all."""

    def __init__(self, records: JsonlPages, family, processor, dtype: torch.dtype, max_label_tokens: int,
                 cache=None):
        self.records, self.family, self.processor, self.dtype = records, family, processor, dtype
        self.max_label_tokens, self.cache = max_label_tokens, cache

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Encoded:
        e = self.records[i]
        key = self.cache.key(e.image) if self.cache is not None else None
        hit = self.cache.get(key) if key is not None else None
        if hit is not None:
            features, image_tokens = hit
            x = self.family.encode_text(self.processor, e.prompt, e.target, image_tokens, self.max_label_tokens)
            x.features = features.to(self.dtype)
        else:
            x = self.family.encode_example(self.processor, load_image(e.image), e.prompt, e.target,
                                           self.max_label_tokens)
            # in the model's dtype: half the memory and copying in bf16
            x.pixel = {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                       for k, v in x.pixel.items()}
        x.index, x.cache_key = i, key
        return x


@dataclass
class MicroBatch:
    tensors: dict  # what pad_batch makes
    pages: list[Encoded]  # its examples' bookkeeping (tensors dropped): index, cache key, label tokens
    last_of_step: bool


def step_plan(n_pages: int, batch_size: int, grad_accum: int, steps: int, seed: int,
              lengths=None) -> list[list[list[int]]]:
    """Every step's micro-batches of page indices, drawn up front with the same seed on every rank, so all ranks
    agree and a resumed run continues the same sequence. Pages are shuffled once per epoch and epochs follow each
    other without a gap, so every micro-batch holds `batch_size` pages, even when the dataset has fewer pages
    than a batch (a page then appears twice in it).

    lengths (train.group_by_length): pages of similar length share micro-batches, so fewer padding positions
    are computed. As transformers' LengthGroupedSampler does, the page order is cut into groups of up to 50
    micro-batches, each group sorted by length and its micro-batches shuffled: every page still comes once per
    epoch and the loss is the same token-weighted mean; only the company a page keeps changes."""
    rng = random.Random(seed)
    take = batch_size * (max(1, min(50, n_pages // batch_size)) if lengths is not None else 1)
    order: list[int] = []
    micro: list[list[int]] = []
    while len(micro) < steps * grad_accum:
        while len(order) < take:
            order += rng.sample(range(n_pages), n_pages)
        chunk, order = order[:take], order[take:]
        if lengths is not None:
            chunk.sort(key=lambda i: -lengths[i])
        group = [chunk[j:j + batch_size] for j in range(0, take, batch_size)]
        if lengths is not None:
            rng.shuffle(group)
        micro += group
    return [micro[s * grad_accum:(s + 1) * grad_accum] for s in range(steps)]


def rank_share(micro_batch: list[int], rank: int, world_size: int) -> list[int]:
    """The pages of a micro-batch that one DDP process prepares and trains on."""
    return micro_batch[rank::world_size]


def train_batches(dataset: TrainPages, plan: list[list[list[int]]], rank: int, world_size: int, pad_id: int,
                  left: bool, workers: int, pin_memory: bool, prefetch: int = 4) -> Iterator[MicroBatch]:
    """This process's micro-batches of `plan`, step after step: pages prepared in `workers` processes, padded
    and pinned in a thread, a few micro-batches ahead of the loop."""
    shares = [[rank_share(mb, rank, world_size) for mb in step] for step in plan]
    pages = page_loader(dataset, (i for step in shares for mb in step for i in mb), workers, prefetch)

    def batches():
        for step in shares:
            for k, mb in enumerate(step):
                items = [next(pages) for _ in mb]
                tensors = pin(pad_batch(items, pad_id, dataset.family, left, pin_memory), pin_memory)
                kept = [_bookkeeping(x) for x in items]
                del items  # the pages' own tensors (27 MiB each): not held while the queue is full
                yield MicroBatch(tensors, kept, k == len(step) - 1)
    return background(batches(), depth=1)


def _bookkeeping(x: Encoded) -> Encoded:
    return Encoded(input_ids=torch.empty(0), labels=torch.empty(0), pixel={}, label_tokens=x.label_tokens,
                   image_tokens=x.image_tokens, index=x.index, cache_key=x.cache_key)


def pad_batch(items: list[Encoded], pad_id: int, family, left: bool = False, pin: bool = False) -> dict:
    """Pad a list of Encoded examples into one batch (on the right, or on the left so that every example's
    target ends at the last position). Image inputs: pixels when no example has features; otherwise
    `image_features` per example (None where not yet computed) and `missing_pixels`, the pixels of those, one
    page each: their features go to the feature cache, computed with the page alone (train.fill_image_features)."""
    width = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, x in enumerate(items):
        n = len(x.input_ids)
        span = slice(width - n, width) if left else slice(0, n)
        ids[i, span], labels[i, span], mask[i, span] = x.input_ids, x.labels, 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if all(x.features is None for x in items) and not any(x.cache_key for x in items):
        return {**batch, **family.collate_pixels([x.pixel for x in items], pin)}
    missing = [x.pixel for x in items if x.features is None]
    batch["image_features"] = [x.features for x in items]
    if missing:
        batch["missing_pixels"] = [family.collate_pixels([pixel], pin) for pixel in missing]
    return batch


def model_inputs(batch: dict) -> dict:
    """A batch as the model's forward takes it: image features go in through `mm_encoder_outputs`, which both
    families accept in place of pixels."""
    inputs = dict(batch)
    features = inputs.pop("image_features", None)
    if features is not None:
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return inputs


# ---------------------------------------------------------------- generation (infer, evaluate, local teacher)

@dataclass
class PageFailure:
    reason: str


class PromptPages(Dataset):
    """Generation inputs of page images, made when asked for (in a worker); a page that cannot be read is a
    PageFailure with the reason, not an error that stops the run."""

    def __init__(self, images: list, family, processor, prompt: str, dtype: torch.dtype):
        self.images, self.family, self.processor, self.prompt, self.dtype = images, family, processor, prompt, dtype

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        try:
            image = load_image(self.images[i])
        except (OSError, ValueError) as e:
            return PageFailure(str(e))
        page = self.family.prompt_inputs(self.processor, image, self.prompt)
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in page.items()}


@dataclass
class GenerationBatch:
    indices: list[int]  # the readable pages in `inputs`, in order
    inputs: dict | None  # left-padded (None when only failures are reported)
    width: int  # the prompt length: generated tokens start there
    failures: list[tuple[int, str]]  # pages met since the last batch that could not be read, with the reason


def batch_plan(n_pages: int, batch_size: int) -> list[list[int]]:
    """The generation batches of n pages: consecutive runs of `batch_size` in order. Fixed before any page is
    read, so every engine (this process, Ray) decodes the same pages together, and a page that cannot be
    read leaves its batch one smaller rather than moving the pages after it into other batches: batch
    composition changes float rounding, hence greedy outputs, and the engines' outputs must be identical."""
    return [list(range(s, min(s + batch_size, n_pages))) for s in range(0, n_pages, batch_size)]


def prepare_batch(dataset: "PromptPages", indices: list[int], pages: list, pin_memory: bool) -> GenerationBatch:
    """One planned batch from its pages as the workers prepared them (dicts, or PageFailure)."""
    ready = [(i, p) for i, p in zip(indices, pages) if not isinstance(p, PageFailure)]
    failures = [(i, p.reason) for i, p in zip(indices, pages) if isinstance(p, PageFailure)]
    pad_id = dataset.processor.tokenizer.pad_token_id
    inputs, width = (dataset.family.collate_prompts([p for _, p in ready], pad_id, pin_memory)
                     if ready else (None, 0))
    return GenerationBatch([i for i, _ in ready], pin(inputs, pin_memory), width, failures)


def generation_batches(dataset: PromptPages, batch_size: int, workers: int,
                       pin_memory: bool) -> Iterator[GenerationBatch]:
    """The batches of `batch_plan`, in order, their pages prepared in `workers` processes and padded in a
    thread while the GPU decodes the batch before."""
    pages = page_loader(dataset, range(len(dataset)), workers)

    def batches():
        for indices in batch_plan(len(dataset), batch_size):
            chunk = [next(pages) for _ in indices]
            ready = prepare_batch(dataset, indices, chunk, pin_memory)
            chunk = None  # the pages' own tensors: not held while the queue is full
            yield ready
    # one batch ready beside the one decoding: preparing a batch takes a fraction of decoding it, and each
    # batch in flight is batch_size pages of pixels (27 MiB a gundam page in bf16) in pinned host memory
    return background(batches(), depth=1)
