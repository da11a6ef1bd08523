"""Page images -> Markdown with a local model (base, or base + LoRA adapter)."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .lora import load_adapter
from .models.base import load_image
from .dataset import make_record
from .params import DEFAULT_PROMPT, Params
from .teachers.base import PageInput, PageLabel
from .pdf import parse_page_image_name
from .runtime import pick_device, pick_dtype
from .train import adapter_params, load_base, to_device


class LocalModel:
    """A loaded model ready to transcribe: the family's functions, the model and its processor."""

    def __init__(self, params: Params, adapter_dir: str | Path | None = None, device: str = "auto",
                 static_cache: bool | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(params.train.dtype, self.device)
        # Fast decoding on CUDA (benchmarks/speed.py, H100, full size, batch 1: 15.7 -> 3.2 ms/token): a static
        # KV cache, which transformers decodes through torch.compile, and no cuDNN attention, which planned
        # anew for every KV length. The first batch pays the compilation (tens of seconds).
        choice = params.evaluate.static_cache
        self.static_cache = static_cache if static_cache is not None else (
            choice == "on" or (choice == "auto" and self.device.startswith("cuda")))
        if self.static_cache and self.device.startswith("cuda"):
            torch.backends.cuda.enable_cudnn_sdp(False)
        if adapter_dir is not None:
            params = adapter_params(params, adapter_dir)
        self.family, model, self.processor, _ = load_base(params, self.device, self.dtype)
        self.model = load_adapter(model, adapter_dir) if adapter_dir is not None else model
        self.model.eval()

    def transcribe(self, images: list, prompt: str, max_new_tokens: int, no_repeat_ngram_size: int = 0) -> list[str]:
        return [text for text, _ in self.generate(images, prompt, max_new_tokens, no_repeat_ngram_size)]

    @torch.inference_mode()
    def generate(self, images: list, prompt: str, max_new_tokens: int,
                 no_repeat_ngram_size: int = 0) -> list[tuple[str, str]]:
        """Greedy transcriptions of a batch of pages, each with its finish reason (`stop` or `length`)."""
        inputs, width = self.family.generation_inputs(self.processor, images, prompt)
        inputs = to_device(inputs, self.device, self.dtype)
        tok = self.processor.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  no_repeat_ngram_size=no_repeat_ngram_size or None,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  cache_implementation="static" if self.static_cache else None)
        results = []
        for row in out[:, width:]:
            stopped = bool((row == tok.eos_token_id).any())
            results.append((tok.decode(row, skip_special_tokens=True).strip(), "stop" if stopped else "length"))
        return results


def transcribe_paths(model: LocalModel, paths: Iterable[Path], prompt: str, max_new_tokens: int,
                     batch_size: int = 1, no_repeat_ngram_size: int = 0,
                     progress: bool = True) -> Iterator[tuple[Path, str]]:
    paths = list(paths)
    bar = tqdm(total=len(paths), desc="transcribe", unit="page", disable=not progress)
    for i in range(0, len(paths), batch_size):
        chunk = paths[i:i + batch_size]
        texts = model.transcribe([load_image(p) for p in chunk], prompt, max_new_tokens, no_repeat_ngram_size)
        bar.update(len(chunk))
        yield from zip(chunk, texts)
    bar.close()


def group_pages(paths: Iterable[Path]) -> dict[str, list[Path]]:
    """`{doc}_p{N}.png` files grouped by document, pages in numeric order; other names are one-page docs."""
    groups: dict[str, list[tuple[int, Path]]] = defaultdict(list)
    for p in paths:
        parsed = parse_page_image_name(p.name)
        doc, page = parsed if parsed else (p.stem, 1)
        groups[doc].append((page, p))
    return {doc: [p for _, p in sorted(items)] for doc, items in sorted(groups.items())}


def image_pages(paths: Iterable[Path]) -> list[PageInput]:
    """PageInputs for page images without their PDFs (`infer --images`; pages rendered from PDFs here come
    with theirs from the render manifest, pdf.source_pdf)."""
    pages = []
    for doc, files in group_pages(paths).items():
        for p in files:
            parsed = parse_page_image_name(p.name)
            pages.append(PageInput(doc, parsed[1] if parsed else 1, p))
    return pages


def infer_documents(teacher, pages: list[PageInput], out_dir: str | Path, fmt: str = "md",
                    progress: bool = True) -> list[Path]:
    """Transcribe pages with any teacher; write each document the moment its last page is answered, so
    finished documents can be opened while the run goes on. Returns the files in the order written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    expected = Counter(p.doc for p in pages)
    done: dict[str, list[PageLabel]] = defaultdict(list)
    written = []
    bar = tqdm(total=len(pages), desc=f"infer ({teacher.name})", unit="page", disable=not progress)
    for label in teacher.label(pages):
        bar.update(1)
        done[label.doc].append(label)
        if len(done[label.doc]) == expected[label.doc]:
            written.append(write_document(label.doc, sorted(done.pop(label.doc), key=lambda x: x.page), pages,
                                          out_dir, fmt))
            bar.set_postfix(docs=len(written))
    bar.close()
    return written


def write_document(doc: str, labels: list[PageLabel], pages: list[PageInput], out_dir: Path, fmt: str) -> Path:
    path = out_dir / f"{doc}.{fmt}"
    if fmt == "md":
        # A page without a transcription stays visible as a comment, so a reader knows text is missing.
        text = "\n\n".join(
            x.text.strip() if x.status == "labeled" else
            f"<!-- page {x.page}: {x.status}: {x.reason} -->" + (f"\n{x.text.strip()}" if x.text else "")
            for x in labels) + "\n"
    elif fmt == "json":
        text = json.dumps({"doc": doc, "pages": [asdict(x) for x in labels]}, indent=2, ensure_ascii=False) + "\n"
    else:  # jsonl: training records, image paths relative to this file
        images = {(p.doc, p.page): p.image for p in pages}
        rows = [make_record(os.path.relpath(images[(doc, x.page)], out_dir), DEFAULT_PROMPT, x.text, doc, x.page)
                for x in labels if x.status == "labeled"]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)  # atomic: a reader never sees half a document
    return path
