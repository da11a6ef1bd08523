"""Transcription on a Ray cluster through Ray Data: `runtime.engine: ray`.

    batch plan (driver) -> CPU tasks on any node: read the batch's page images, run the processor, pad
    -> a pool of actors, each holding the model on its GPU(s): decode, store each answer -> driver: documents

The stages stream: a batch is decoded while the next ones are prepared elsewhere, and Ray Data's backpressure
keeps the prepared batches in flight within the object store's budget, so memory is flat in the corpus size.
The batches are `data.batch_plan`'s, the same the local engine decodes, and each is prepared and decoded by
the same functions (`data.PromptPages`, `data.prepare_batch`, `LocalModel.generate_batch`): on the same pages
the two engines' outputs are identical (greedy decoding is deterministic given the batch and the kernels; a
GPU of another kind, or another thread count on CPU, may round differently).

Faults: an actor that dies (its process killed, its node lost) is restarted and its unfinished batch run
again (Ray Data's actor restarts and task retries). Answers are stored by the actor that decoded them, in the
label cache (`teacher.cache_dir`, on storage every node sees) before the driver hears of them, and a batch
whose answers are all stored is not decoded again, so a killed worker or a killed run redoes no finished page.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import ray
import ray.data
import torch
from tqdm.auto import tqdm

from ..data import PromptPages, batch_plan, prepare_batch
from ..loading import adapter_params
from ..params import Params, RuntimeParams
from ..runtime import pick_dtype
from ..teachers.cache import Answers, LabelCache


def connect(runtime: RuntimeParams) -> None:
    """Join the cluster `runtime.ray_address` (or $RAY_ADDRESS) names, or start one on this machine."""
    if ray.is_initialized():
        return
    address = runtime.ray_address or os.environ.get("RAY_ADDRESS") or None
    ray.init(address=address, num_cpus=None if address else runtime.num_cpus, include_dashboard=False,
             logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts pages, Ray's count blocks
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to build the processor or the model: sent to every task and actor."""

    params: Params  # with the family, base and resolution the adapter was trained with (adapter_params)
    adapter_dir: str | None
    device: str  # of the actors: cuda or cpu
    # CPU decoding: the driver's intra-op thread count. Ray gives an actor as many threads as it has CPUs,
    # and a matrix product summed in another number of threads rounds differently: the actors then decode
    # other tokens than the local engine on the same machine (seen in tests: evaluate's outputs differed).
    threads: int = 1

    @property
    def dtype(self):
        return pick_dtype(self.params.train.dtype, self.device)


_processors: dict = {}  # per worker process: a task's processor is loaded once, not once per batch


def _prompt_pages(spec: ModelSpec, prompt: str, paths: list[str]) -> PromptPages:
    from ..loading import checkpoint_path, load_processor
    from ..models import get_family

    m = spec.params.model
    key = (m.family, m.base, m.resolution, m.cache_dir)
    if key not in _processors:
        _processors[key] = (get_family(m.family), load_processor(spec.params, checkpoint_path(spec.params)))
    family, processor = _processors[key]
    return PromptPages(paths, family, processor, prompt, spec.dtype)


def _prepare(rows: dict, spec: ModelSpec, prompt: str, threads: int) -> dict:
    """CPU task: one planned batch's pages read, preprocessed and padded (a page that cannot be read is
    reported with its reason and leaves the others), its pages `threads` at a time (runtime.cpus_per_task:
    image decoding and resizing release the GIL, and a batch of 64 gundam pages is ~20 s on one core, which
    the first batch makes the whole run wait)."""
    start = time.time()
    torch.set_num_threads(1)
    meta = json.loads(rows["meta"][0])
    dataset = _prompt_pages(spec, prompt, meta["paths"])
    with ThreadPoolExecutor(threads) as pool:
        pages = list(pool.map(dataset.__getitem__, range(len(dataset))))
    batch = prepare_batch(dataset, list(range(len(dataset))), pages, False)
    pages = None
    index, keys = meta["indices"], meta["keys"]
    meta = {"indices": [index[j] for j in batch.indices], "keys": [keys[j] for j in batch.indices] if keys else [],
            "width": batch.width, "failures": [[index[j], reason] for j, reason in batch.failures],
            "times": {"prepare": [start, time.time()]}}
    return {"meta": np.array([json.dumps(meta)]), **_to_columns(batch.inputs or {})}


def _to_columns(inputs: dict) -> dict:
    """A batch's tensors as numpy columns of one row (Ray's object store hands them to the actor without a
    copy, where pickled bytes cost several copies of 27 MiB a page, serially in the actor: measured, H200,
    1,024 pages, batch 64: 9.6 pages/s against the local engine's 17.5), the rest pickled. bf16 has no numpy
    type: its bits travel as int16."""
    columns, rest = {}, {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = str(value.dtype).removeprefix("torch.")
            value = value.contiguous()
            columns[f"t:{key}:{dtype}"] = (value.view(torch.int16) if value.dtype == torch.bfloat16
                                           else value).numpy()[None]
        else:
            rest[key] = value
    columns["rest"] = np.array([pickle.dumps(rest)], dtype=object)
    return columns


def _from_columns(columns: dict) -> dict:
    inputs = pickle.loads(columns["rest"][0])
    with warnings.catch_warnings():  # the object store's arrays are read-only; the model only reads them
        warnings.simplefilter("ignore", UserWarning)
        for column, value in columns.items():
            if column.startswith("t:"):
                _, key, dtype = column.split(":")
                tensor = torch.from_numpy(value[0])
                inputs[key] = tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor
    return inputs


class _Decoder:
    """GPU actor: the model, decoding one prepared batch per call."""

    def __init__(self, spec: ModelSpec, generation: dict, cache_dir: str | None):
        from ..infer import LocalModel

        if spec.device == "cpu":
            torch.set_num_threads(spec.threads)
        self.model = LocalModel(spec.params, adapter_dir=spec.adapter_dir, device=spec.device)
        self.generation = generation
        self.answers = Answers(LabelCache(cache_dir), []) if cache_dir else None
        self.ready = time.time()

    def __call__(self, columns: dict) -> dict:
        start = time.time()
        meta = json.loads(columns["meta"][0])
        results = []
        if meta["indices"]:
            stored = [self.answers.cache.get(k) for k in meta["keys"]] if self.answers and meta["keys"] else []
            if stored and all(e is not None for e in stored):  # a retried batch its dead actor had finished
                results = [(e["text"], e.get("finish_reason", "stop")) for e in stored]
            else:
                results = self.model.generate_batch(_from_columns(columns), meta["width"], **self.generation)
                for key, old, (text, finish) in zip(meta["keys"], stored or [None] * len(results), results):
                    if self.answers is not None and old is None:
                        self.answers.put(key, text, finish)
        times = {**meta["times"], "actor_ready": self.ready, "decode": [start, time.time()]}
        return {"meta": np.array([json.dumps({"failures": meta["failures"], "times": times,
                                              "results": [[i, text, finish] for i, (text, finish) in
                                                          zip(meta["indices"], results)]})])}


def _spread() -> dict:
    return {"scheduling_strategy": "SPREAD"}


def _cluster_gpus() -> int:
    return int(ray.cluster_resources().get("GPU", 0))


class RayTranscriber:
    """`LocalModel`'s stream() on a Ray cluster (the module docstring says how)."""

    def __init__(self, params: Params, adapter_dir=None, device: str = "auto"):
        self.runtime = params.runtime
        connect(self.runtime)
        gpus = _cluster_gpus()
        per_actor = self.runtime.gpus_per_actor if device != "cpu" else 0.0
        if device == "cuda" and (not gpus or not per_actor):
            raise ValueError(f"device cuda, but the Ray cluster has {gpus} GPUs and runtime.gpus_per_actor is "
                             f"{self.runtime.gpus_per_actor}")
        if not gpus:
            per_actor = 0.0  # a cluster of CPUs: the actors decode there
        self.gpus_per_actor = per_actor
        if self.runtime.actors == "auto":
            self.actors = max(1, int(gpus // per_actor)) if per_actor else 1
        else:
            self.actors = self.runtime.actors
        if adapter_dir is not None:
            params = adapter_params(params, adapter_dir)  # here, once: not in every task and actor
        self.spec = ModelSpec(params, str(adapter_dir) if adapter_dir is not None else None,
                              "cuda" if per_actor else "cpu", torch.get_num_threads())
        # what the actors leave of the cluster's CPUs: a task asking for more would wait forever
        free = ray.cluster_resources().get("CPU", 0) - self.actors * self.runtime.cpus_per_actor
        if free <= 0:
            raise ValueError(f"runtime: {self.actors} actors x runtime.cpus_per_actor {self.runtime.cpus_per_actor} "
                             f"take every CPU of the Ray cluster ({ray.cluster_resources().get('CPU', 0):g}); "
                             "none is left to prepare pages: lower runtime.actors or runtime.cpus_per_actor")
        self.task_cpus = min(self.runtime.cpus_per_task, free)
        self.data_wait_fraction = None  # the local engine's measure; here the actors wait, not this process
        self.first_wait_s = None

    def stream(self, images: list, prompt: str, max_new_tokens: int, batch_size: int = 1,
               no_repeat_ngram_size: int = 0, progress: bool = True, no_repeat_window: int = 90,
               desc: str = "transcribe", answers: Answers | None = None) -> Iterator[tuple[int, str | None, str]]:
        images = [str(p) for p in images]
        if not images:
            return
        keys = answers.keys if answers is not None else None
        rows = [{"meta": json.dumps({"indices": idx, "paths": [images[i] for i in idx],
                                     "keys": [keys[i] for i in idx] if keys else []})}
                for idx in batch_plan(len(images), batch_size)]
        generation = {"max_new_tokens": max_new_tokens, "no_repeat_ngram_size": no_repeat_ngram_size,
                      "no_repeat_window": no_repeat_window}
        cache_dir = str(answers.cache.folder) if answers is not None else None
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one batch a block: each its own task
        # Spread over the nodes, and never fused into the actors' operator (Ray Data fuses a task map into the
        # actor map after it when their resources match, which would read every page in the GPU's process):
        # a ray_remote_args_fn keeps the two apart.
        ds = ds.map_batches(_prepare, batch_size=1, batch_format="numpy",
                            fn_kwargs={"spec": self.spec, "prompt": prompt,
                                       "threads": max(1, round(self.task_cpus))},
                            num_cpus=self.task_cpus,
                            ray_remote_args_fn=_spread)
        ds = ds.map_batches(_Decoder, batch_size=1, batch_format="numpy", zero_copy_batch=True,
                            fn_constructor_kwargs={"spec": self.spec, "generation": generation,
                                                   "cache_dir": cache_dir},
                            # Ray Data restarts a dead actor and retries its batch by default (max_restarts -1)
                            compute=ray.data.ActorPoolStrategy(size=min(self.actors, len(rows))),
                            num_gpus=self.gpus_per_actor, num_cpus=self.runtime.cpus_per_actor)
        bar = tqdm(total=len(images), desc=f"{desc} (ray, {self.actors} actors)", unit="page", disable=not progress)
        self.timeline = []  # each batch's (prepare start, end), decode (start, end), its actor's ready time
        for row in ds.iter_rows():
            meta = json.loads(row["meta"])
            self.timeline.append(meta["times"])
            for i, reason in meta["failures"]:
                bar.update(1)
                yield i, None, reason
            for i, text, finish in meta["results"]:
                bar.update(1)
                yield i, text, finish
        bar.close()

    @staticmethod
    def mapper(runtime: RuntimeParams) -> Callable[[Callable, list], Iterator[tuple[int, object]]]:
        def map_pages(fn: Callable, items: list) -> Iterator[tuple[int, object]]:
            """(index, fn(item)) for every item, in CPU tasks over the cluster, as they finish."""
            connect(runtime)
            if not items:
                return
            rows = [{"i": i, "item": pickle.dumps(x)} for i, x in enumerate(items)]
            cpus = min(runtime.cpus_per_task, ray.cluster_resources().get("CPU", 1))  # more would never schedule
            ds = ray.data.from_items(rows).map(_apply, fn_kwargs={"fn": fn}, num_cpus=cpus)
            for row in ds.iter_rows():
                yield row["i"], pickle.loads(row["result"])
        return map_pages


def _apply(row: dict, fn: Callable) -> dict:
    return {"i": row["i"], "result": pickle.dumps(fn(pickle.loads(row["item"])))}
