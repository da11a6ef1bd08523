"""The typed schema of params.yaml, checked before any work starts.

Every stage and CLI command reads its settings through `load_params`, so a typo or a bad value stops the run
with one message that names the key and what it accepts, instead of failing an hour into training.
"""

from __future__ import annotations

import os

import re
from pathlib import Path
from typing import Annotated, Literal, Union, get_args

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from .models import FAMILIES
from .pdf import MAX_PAGE_PIXELS

DEFAULT_PROMPT = "<image>\n<|grounding|>Convert the document to markdown."


class ParamsError(ValueError):
    """params.yaml (or a -S override) is invalid; the message names the key and the allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _within(folder: Path, other: Path) -> bool:
    """`folder` is `other` or inside it (after resolving both)."""
    return folder.resolve().is_relative_to(other.resolve())


def _workers(v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
        return v
    raise ValueError("allowed values: auto, or a number of worker processes (0 = none)")


# worker processes that prepare pages: `auto` or a count
Workers = Annotated[Union[int, Literal["auto"]], BeforeValidator(_workers)]


class DataParams(_Section):
    pdf_dir: str = "data/samples/pdfs"
    truth_dir: str | None = "data/samples/truth"  # ground truth per page, if the user has any
    pages_dir: str = "data/pages"
    labels_dir: str = "data/labels"
    dataset_dir: str = "data/dataset"

    @model_validator(mode="after")
    def _outputs_apart_from_inputs(self):
        # the stages empty their output folders (and `dvc repro` deletes them): one that holds the user's PDFs
        # or ground truth would take them along
        inputs = {"data.pdf_dir": self.pdf_dir, **({"data.truth_dir": self.truth_dir} if self.truth_dir else {})}
        for out_key in ("pages_dir", "labels_dir", "dataset_dir"):
            out = Path(getattr(self, out_key))
            for in_key, folder in inputs.items():
                if _within(Path(folder), out):
                    raise ValueError(f"data.{out_key} ({getattr(self, out_key)}) holds {in_key} ({folder}); the "
                                     f"pipeline empties data.{out_key}, so give it a folder of its own")
        return self


class Pdf2ImgParams(_Section):
    dpi: int = Field(200, ge=36, le=600)  # the seed README's default (params.yaml: 100 for the demo)
    format: Literal["png", "jpg"] = "png"
    start_page: int = Field(1, ge=1)
    end_page: int | None = Field(None, ge=1)
    workers: int = Field(2, ge=1, le=64)
    # pixels per page at most: a larger page (a poster, a drawing) is rendered at the dpi that fits (pdf.py,
    # MAX_PAGE_PIXELS, says why 20 million); from 1 MP (about an A4 page at 100 dpi) to below the size Pillow
    # refuses to open (179 MP), which every later stage reads pages with
    max_pixels: int = Field(MAX_PAGE_PIXELS, ge=1_000_000, le=170_000_000)

    @model_validator(mode="after")
    def _range(self):
        if self.end_page is not None and self.end_page < self.start_page:
            raise ValueError(f"end_page ({self.end_page}) is before start_page ({self.start_page})")
        return self


class ApiTeacherParams(_Section):
    """An OpenAI-compatible chat-completions server (vLLM, OpenAI, ...)."""

    # one server, or several as a list of URLs or {url, concurrent_requests, api_key_env} mappings (an
    # endpoint's own concurrency and key variable; by default this section's): pages go to whichever is free
    base_url: str | list = "http://localhost:8000/v1"
    model_name: str = "deepseek-ai/DeepSeek-OCR"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the environment variable holding the key
    concurrent_requests: int = Field(8, ge=1, le=256)
    timeout: float = Field(120.0, gt=0)  # seconds the server may stay silent (per read)
    deadline: float | None = Field(600.0, gt=0)  # seconds one request may take in all, however it trickles; null: none
    max_retries: int = Field(5, ge=0, le=20)
    backoff: float = Field(1.0, gt=0)  # first retry waits ~this many seconds, doubling each time, with jitter
    max_backoff: float = Field(60.0, gt=0)
    max_tokens: int = Field(4096, ge=1)
    # the request field that carries max_tokens: newer OpenAI models accept only max_completion_tokens
    max_tokens_param: Literal["max_tokens", "max_completion_tokens"] = "max_tokens"
    temperature: float | None = Field(0.0, ge=0.0, le=2.0)  # null: not sent (models that refuse the setting)
    # Several endpoints: one that fails this many times without an answer between (each refused or dropped
    # connection, and each page it answers with a 5xx, a timeout or a malformed reply) gets no pages for
    # endpoint_cooldown seconds, and its pages go to the others; the last one up is never taken out.
    endpoint_failures: int = Field(3, ge=1, le=1000)
    endpoint_cooldown: float = Field(60.0, gt=0)

    @field_validator("base_url", mode="before")
    @classmethod
    def _base_url_without_secrets(cls, v):
        if isinstance(v, str):
            return _no_secret_in_url(v, "the environment variable that api_key_env names")
        if not isinstance(v, list) or not v:
            raise ValueError("give a URL, or a non-empty list of URLs or {url, concurrent_requests} mappings")
        seen = {}
        for n, item in enumerate(v, 1):
            url = cls._endpoint(item, f"item {n} of the list").rstrip("/")
            if url in seen:
                raise ValueError(f"item {n} of the list repeats item {seen[url]}'s URL {url}")
            seen[url] = n
        return v

    @classmethod
    def _endpoint(cls, item, where: str) -> str:
        """A list item's URL, once the item is checked."""
        if isinstance(item, dict):
            unknown = set(item) - {"url", "concurrent_requests", "api_key_env"}
            if unknown:
                raise ValueError(f"{where}: unknown key `{sorted(map(str, unknown))[0]}` (known keys: url, "
                                 "concurrent_requests, api_key_env)")
            workers = item.get("concurrent_requests")
            if workers is not None and (type(workers) is not int or not 1 <= workers <= 256):
                raise ValueError(f"{where}: concurrent_requests must be a whole number from 1 to 256")
            if item.get("api_key_env") is not None:
                try:
                    cls._a_name_not_a_key(item["api_key_env"] if isinstance(item["api_key_env"], str) else "")
                except ValueError as e:
                    raise ValueError(f"{where}: api_key_env: {e}") from None
            item = item.get("url")
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: give a URL, or a mapping with one as `url`")
        try:
            return _no_secret_in_url(item, "the environment variable that api_key_env names")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def endpoints(self) -> list[dict]:
        """base_url as a list of {url, concurrent_requests, api_key_env}, the section's values filled in."""
        items = [self.base_url] if isinstance(self.base_url, str) else self.base_url
        return [{"concurrent_requests": self.concurrent_requests, "api_key_env": self.api_key_env,
                 **({"url": item} if isinstance(item, str) else
                    {k: v for k, v in item.items() if v is not None})} for item in items]

    @field_validator("api_key_env")
    @classmethod
    def _a_name_not_a_key(cls, v):
        # names in capitals only: keys (sk-..., hf_..., gsk_...) mix cases, and this value is logged
        if not re.fullmatch(r"[A-Z_][A-Z0-9_]*", v):
            raise ValueError("give the name of an environment variable that holds the key, in capitals (e.g. "
                             "OPENAI_API_KEY), never the key itself")
        return v


class LocalTeacherParams(_Section):
    """A model of this project's families (model.*), optionally with a LoRA adapter, on this machine."""

    adapter: str | None = None
    batch_size: int = Field(4, ge=1)
    # The official inference code's limits for rendered PDF pages: 8192 new tokens; no n-gram of 20 tokens
    # twice within the last 50 generated (table-cell tags exempt; 0 = no guard).
    max_new_tokens: int = Field(8192, ge=1)
    no_repeat_ngram_size: int = Field(20, ge=0)
    no_repeat_window: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class TeacherParams(_Section):
    kind: Literal["pdf_text", "api", "local"] = "pdf_text"
    min_chars: int = Field(1, ge=1)  # pdf_text: fewer characters than this on a page = no usable text layer
    prompts_file: str = "config/prompts.yaml"  # api/local: prompts by task ({task: {system, user}})
    task: str = "document"
    cache_dir: str = "data/teacher_cache"  # api/local: every answer, keyed by image, prompt, model and settings
    # Output guards: a page whose answer loops (this share of repeated word 8-grams or more) or runs into
    # max_tokens is marked `degenerate` and not trained on.
    max_repeat_fraction: float = Field(0.5, gt=0.0, le=1.0)
    # Pages that failed (server errors, timeouts, unreadable images) stop teacher_label after it has written the
    # others, so the next `dvc repro` asks for them again; true: the stage passes and the dataset goes without them
    allow_failed_pages: bool = False
    api: ApiTeacherParams = ApiTeacherParams()
    local: LocalTeacherParams = LocalTeacherParams()
    # prompts written inline ({task: {system, user}}, the seed teacher config's `prompts:`): used instead of
    # prompts_file when set
    prompts: dict[str, dict[str, str | None]] | None = None


class DatasetParams(_Section):
    prompt: str = DEFAULT_PROMPT
    eval_fraction: float = Field(0.34, ge=0.0, lt=1.0)
    seed: int = 0

    @field_validator("prompt")
    @classmethod
    def _has_image(cls, v):
        if "<image>" not in v:
            raise ValueError("the prompt must contain the <image> placeholder")
        return v


# Image-view presets per family, from the family registry (which imports no model code).
RESOLUTIONS = {name: presets for name, (_, presets) in FAMILIES.items()}


class ModelParams(_Section):
    family: Literal[tuple(FAMILIES)] = "deepseek-ocr2"  # the registered families (models/__init__.py)
    # `tiny` builds a small random model offline; otherwise a hub id or a local checkpoint directory.
    base: str = "tiny"
    cache_dir: str = "models/base"
    # Image views fed to the model, the same in train and infer (saved with the adapter):
    # deepseek-ocr2: nocrop (one 768px view, 145 tokens) | gundam (1024px + up to 6 tiles of 768px)
    # deepseek-ocr: tiny 512 | small 640 | base 1024 | large 1280 (one view) | gundam (1024px + up to 9 of 640px)
    resolution: str = "nocrop"
    allow_download: bool = True
    load_in_4bit: bool = False  # QLoRA: base weights in 4 bits (bitsandbytes, CUDA only)
    # SAM's relative-position attention through SDPA's flash kernels (models._deepseek.use_fused_sam_attention),
    # on CUDA (slower than the plain attention on the CPU)
    fused_sam_attention: bool = True
    # Its kernel on CUDA: flash (v padded to q and k's head size) | cudnn (a shorter v; cuDNN attention,
    # 2.5% faster training of `both` on the H100; flash where cuDNN cannot train these head sizes)
    sam_attention_kernel: Literal["flash", "cudnn"] = "cudnn"
    # Routed experts by batch size (models.moe): every expert on every token for decode batches, instead of
    # transformers' per-token copies of expert weights; grouped_mm for long inputs, as before.
    adaptive_experts: bool = True
    # Images per vision-tower pass (models._deepseek.chunk_vision_tower): bounds the memory of the tower's
    # largest layer, recomputed under checkpointing or run in one inference prefill; 0 = all at once. Off by
    # default: passes of 16 saved 7.5 GiB at batch 24 of `both` but cost 29% of its speed on the H100.
    vision_batch: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _resolution(self):
        allowed = RESOLUTIONS[self.family]
        if self.resolution not in allowed:
            raise ValueError(f"resolution {self.resolution!r} is not a preset of {self.family} "
                             f"(allowed values: {', '.join(allowed)})")
        return self


class LoraParams(_Section):
    mode: Literal["vision", "llm", "both"] = "both"
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    experts: bool = False  # also adapt the routed experts (fused parameters, through PEFT target_parameters)
    # only these module names (the last part of a path, e.g. q_proj) among the mode's targets in each tower;
    # null = all of them (the seed config's vision_target_modules / llm_target_modules)
    vision_modules: list[str] | None = None
    llm_modules: list[str] | None = None
    # LoRA branches computed in the model's dtype (bf16 on GPU) with float32 weights (lora.compute_in_model_dtype),
    # or wholly in float32 as PEFT does by default (slower: a float32 copy of every adapted layer's input).
    compute: Literal["model_dtype", "float32"] = "model_dtype"

    @model_validator(mode="after")
    def _experts_in_llm(self):
        if self.experts and self.mode == "vision":
            raise ValueError("experts: true adapts the language model's experts; use mode llm or both")
        return self


class NodesParams(_Section):
    """train.nodes: several machines, each running train.num_gpus processes; torchrun's flags of the same names
    (docs/multi_node.md). Ignored when nnodes is 1."""
    nnodes: int = Field(1, ge=1, le=1024)
    node_rank: int = Field(0, ge=0)  # static: this machine's index (0 hosts the rendezvous and writes the adapter)
    # static: each machine names its node_rank; c10d: ranks by joining order (rank 0 on any machine)
    rdzv_backend: Literal["static", "c10d"] = "static"
    rdzv_endpoint: str = ""  # host:port every machine reaches; static: node_rank 0's address
    rdzv_id: str = Field("ocr-finetune", min_length=1)  # c10d: the job's name, the same on every machine

    @model_validator(mode="after")
    def _rendezvous(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"train.nodes.node_rank ({self.node_rank}) must be below train.nodes.nnodes "
                             f"({self.nnodes}): machines count from 0")
        if self.nnodes > 1:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"train.nodes.rdzv_endpoint {self.rdzv_endpoint!r}: train.nodes.nnodes "
                                 f"{self.nnodes} needs the host:port every machine reaches (e.g. 10.0.0.1:29500)")
        return self


class TrainParams(_Section):
    seed: int = 0
    epochs: int = Field(20, ge=1)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    batch_size: int = Field(2, ge=1)  # pages per forward pass over all GPUs (of all nodes) together
    grad_accum: int = Field(1, ge=1)  # forward passes per optimizer step
    # per node; >1 (or nodes.nnodes > 1): data parallel through torchrun (CPU processes when device=cpu)
    num_gpus: int = Field(1, ge=1, le=64)
    nodes: NodesParams = NodesParams()  # several machines: world size = nodes.nnodes x num_gpus
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_label_tokens: int = Field(512, ge=8)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # true: every layer recomputes its activations in the backward pass; vision: only the vision towers' layers
    # (where full pages keep most activations), the language model keeps its own: faster, more memory.
    gradient_checkpointing: bool | Literal["vision"] = False
    logits_on_targets: bool = True  # the LM head only over target positions (train.batch_loss)
    # ... and over this many positions at a time, each slice's logits recomputed in the backward pass
    # (train.chunked_cross_entropy: the full logits were the step's largest allocation); 0 = all at once
    loss_chunk: int = Field(1024, ge=0)
    # lora.mode llm: the frozen vision towers run once per page, not once per step: each page's features are
    # computed the first time it is trained on and kept on disk (ocr_finetune.feature_cache), for later epochs,
    # resumed runs and other experiments on the same pages; least recently read first out past the size
    cache_vision_features: bool = True
    feature_cache_dir: str = "models/feature_cache"  # not a DVC output: `dvc exp run` keeps it between experiments
    feature_cache_gib: float = Field(50.0, ge=0)  # 2.9 MB a page at full size (gundam); 0 = no cache
    # Pages are prepared (read, processor, tokeniser) in worker processes, a few ahead of the GPU:
    # auto = every core but one, shared among the GPUs of the host; 0 = in the training process.
    num_workers: Workers = "auto"
    prefetch: int = Field(2, ge=1)  # pages each worker prepares ahead
    # Pages of similar label length share micro-batches (less padding to compute; data.step_plan)
    group_by_length: bool = False
    # Regional torch.compile of the layers (ocr_finetune.compiled): all | vision (towers) | llm | none.
    # auto (train.compile_scope) on CUDA = all, minus the language model with lora.experts or a 4-bit base,
    # minus the vision towers in mode llm with cached features; none on CPU (costs more than it saves).
    compile: Literal["auto", "none", "vision", "llm", "all"] = "auto"
    log_every: int = Field(1, ge=1)
    output_dir: str = "models/adapter"
    # Interrupted runs continue from the last checkpoint (same params and data) instead of restarting.
    save_every: int = Field(50, ge=0)  # steps between checkpoints; 0 = none
    checkpoint_dir: str = "models/checkpoints"  # not a DVC output, so `dvc repro` keeps it for resuming
    resume: Literal["auto", "never", "require"] = "auto"

    @model_validator(mode="after")
    def _split(self):
        for key in ("output_dir", "checkpoint_dir"):  # the adapter is written into it, README.md and all
            if os.path.normpath(getattr(self, key) or ".") == ".":
                raise ValueError(f"{key} {getattr(self, key)!r}: name a folder of its own (e.g. models/adapter), "
                                 "not the project folder")
        if _within(Path(self.checkpoint_dir), Path(self.output_dir)):
            raise ValueError("checkpoint_dir may not be output_dir or inside it: `dvc repro` deletes the adapter "
                             "folder before training, and the checkpoints to resume from would go with it")
        if self.nodes.nnodes == 1 and self.batch_size % self.num_gpus:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_gpus ({self.num_gpus}): "
                             f"the batch is split evenly over the GPUs")
        if self.batch_size % (world := self.nodes.nnodes * self.num_gpus):
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of nodes.nnodes x num_gpus "
                             f"({self.nodes.nnodes} x {self.num_gpus} = {world}): the batch is split evenly over "
                             f"the processes of all nodes")
        return self


class EvaluateParams(_Section):
    split: Literal["eval", "train"] = "eval"
    # pages of the training split read too, scored apart: what the adapter learned, beside how it generalises
    seen_pages: int = Field(16, ge=0)
    # the official evaluation's limits: 8192 new tokens, no 40-gram twice within the last 90 tokens
    max_new_tokens: int = Field(8192, ge=1)
    batch_size: int = Field(2, ge=1)
    no_repeat_ngram_size: int = Field(40, ge=0)
    no_repeat_window: int = Field(90, ge=1)
    # Normalisation applied to reference and output alike before every score (docs/evaluation.md).
    unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    collapse_whitespace: bool = True
    markdown: Literal["keep", "strip"] = "keep"  # strip: score the text only, not #, **, |, list markers
    loop_threshold: float = Field(0.5, gt=0.0, le=1.0)  # repeated word 8-gram share that counts as a loop
    # Decoding (evaluate, infer, local teacher): a static KV cache decoded through torch.compile; auto = on CUDA.
    static_cache: Literal["auto", "on", "off"] = "auto"
    # ... with pages read and preprocessed in worker processes while the GPU decodes the batch before:
    # auto = every core but one; 0 = in the decoding process.
    num_workers: Workers = "auto"


class TrackingParams(_Section):
    experiment: str = "ocr-finetune"
    # Empty = MLflow's default (MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db in the repo).
    tracking_uri: str = ""
    enabled: bool = True

    @field_validator("tracking_uri")
    @classmethod
    def _no_secret(cls, v):
        if v and v not in ("databricks", "databricks-uc") and (v.startswith("file:") or "://" not in v):
            # MLflow 3 stops on its file store ("maintenance mode") with a traceback
            raise ValueError(f"{v!r}: MLflow's folder store is not supported; use a database file such as "
                             "sqlite:///mlflow.db, a server (http://host:5000), or leave it empty")
        return _no_secret_in_url(v, "the environment (MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN)")


# query parameters that carry credentials in the URLs people paste (Azure's api-key, SAS sig, tokens)
_SECRET_NAMES = {"key", "apikey", "sig", "signature", "auth", "authorization", "password", "passwd", "pwd"}


def _no_secret_in_url(url: str, where: str) -> str:
    """Params are logged to MLflow and committed in dvc.lock: a URL may not carry a user:password or a key."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    names = [name.lower().replace("-", "").replace("_", "") for name, _ in parse_qsl(parts.query)]
    userinfo = parts.netloc.rpartition("@")[0]
    # a database URL may name its user (the password then comes from PGPASSWORD or .pgpass); a web URL's
    # user part is a token as often as a name
    if (":" in userinfo or (userinfo and parts.scheme.startswith("http"))
            or any(n in _SECRET_NAMES or n.endswith(("token", "secret", "apikey")) for n in names)):
        raise ValueError(f"the URL carries credentials; params are logged and committed, so put them in {where}")
    return url


class RuntimeParams(_Section):
    """Where pages are transcribed (infer, the local teacher, evaluate): `local`, in this process and its
    workers, or `ray`, on a Ray cluster through Ray Data (ocr_finetune.engines.ray_data): pages prepared in CPU
    tasks on any node, the model in a pool of GPU actors. Training is not affected (torchrun)."""

    engine: Literal["local", "ray"] = "local"
    # a running cluster to join ("auto", "ray://head:10001", "head:6379"); null: $RAY_ADDRESS, else a new
    # cluster on this machine. Every node must reach the same files (pages, teacher.cache_dir, outputs).
    ray_address: str | None = None
    actors: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # model replicas; auto: every GPU of the cluster
    gpus_per_actor: float = Field(1.0, ge=0)  # 0: the actors decode on CPU
    cpus_per_actor: float = Field(1.0, ge=0)
    # each preprocessing task (a batch of pages, read this many at a time) or rendering task (a page)
    cpus_per_task: float = Field(2.0, gt=0)
    num_cpus: int | None = Field(None, ge=1)  # a new local cluster's CPUs (null: all of this machine's)

    @field_validator("ray_address")
    @classmethod
    def _address_without_secrets(cls, v):
        return v if v is None else _no_secret_in_url(v, "the RAY_ADDRESS environment variable")


class Params(_Section):
    data: DataParams = DataParams()
    pdf2img: Pdf2ImgParams = Pdf2ImgParams()
    teacher: TeacherParams = TeacherParams()
    dataset: DatasetParams = DatasetParams()
    model: ModelParams = ModelParams()
    lora: LoraParams = LoraParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()
    runtime: RuntimeParams = RuntimeParams()

    def with_model(self, **changes) -> Params:
        """A copy with these `model.*` settings changed together (a family and its resolution are only valid
        as a pair, so they are not set one at a time)."""
        return self.model_copy(update={"model": self.model.model_copy(update=changes)}, deep=True)


def _allowed(model: type[BaseModel], loc: tuple) -> str | None:
    """The accepted values (Literal choices) or the known keys at a location, for error messages."""
    cls = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part)
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return None
        cls = field.annotation
    field = cls.model_fields.get(loc[-1])
    if field is None:
        return "known keys: " + ", ".join(cls.model_fields)
    choices = get_args(field.annotation)
    if choices and all(isinstance(c, (str, int, bool)) for c in choices) and str(field.annotation).startswith("typing.Literal"):
        return "allowed values: " + ", ".join(map(str, choices))
    return None


# Keys users reach for that are left out on purpose, and why.
NOT_OFFERED = {
    "model.trust_remote_code": "not offered: DeepSeek-OCR's remote code needs transformers 4.46 and fails on the "
                               "5.x this project pins; its weights load natively with model.family=deepseek-ocr "
                               "(docs/models.md, 'Remote code')",
}


def _format(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(str(x) for x in e["loc"])
        key = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            msg = f"unknown key `{key}`" + (f": {NOT_OFFERED[key]}" if key in NOT_OFFERED else "")
        else:
            got = e.get("input")
            shown = "(not shown: it holds credentials)" if "carries credentials" in e["msg"] else repr(got)
            msg = f"`{key}` = {shown}: {e['msg']}"
        hint = _allowed(Params, loc) if loc else None
        lines.append(f"{msg}" + (f" ({hint})" if hint else ""))
    return f"invalid params in {source}:\n  " + "\n  ".join(lines)


def validate_params(raw: dict | None, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format(err, source)) from None


def read_config(path: str | Path) -> dict:
    """A config file's mapping (train/teacher configs), with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path, params: Params) -> Params:
    """Apply a config file (any sections of params.yaml, e.g. `teacher:` and `model:`) over params."""
    return apply_config(read_config(path), params, str(path))


def apply_config(raw: dict, params: Params, source: str) -> Params:
    """Sections of params.yaml (already read) over params."""
    merged = params.model_dump()
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = _deep_merge(merged[section], values)
        else:
            merged[section] = values
    return validate_params(merged, source)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run from the repository root or pass --params)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path} must be a mapping of sections, got {type(raw).__name__}")
    return validate_params(raw, str(path))
