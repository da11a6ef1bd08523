"""Page images -> Markdown with a local model (base, or base + LoRA adapter)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .lora import load_adapter
from .models.base import load_image
from .params import Params
from .pdf import parse_page_image_name
from .runtime import pick_device, pick_dtype
from .train import load_base, read_run_info, to_device


class LocalModel:
    """A loaded model ready to transcribe: the family's functions, the model and its processor."""

    def __init__(self, params: Params, adapter_dir: str | Path | None = None, device: str = "auto"):
        self.device = pick_device(device)
        self.dtype = pick_dtype(params.train.dtype, self.device)
        if adapter_dir is not None:
            # Train and infer must agree on the base and the image views, or the adapter sees other inputs.
            info = read_run_info(adapter_dir)
            if info and (info.get("base"), info.get("resolution")) != (params.model.base, params.model.resolution):
                print(f"note: {adapter_dir} was trained on model.base={info['base']} with "
                      f"model.resolution={info['resolution']}; using those, not params.yaml's", flush=True)
                params = params.model_copy(deep=True)
                params.model.base, params.model.resolution = info["base"], info["resolution"]
        self.family, model, self.processor, _ = load_base(params, self.device, self.dtype)
        self.model = load_adapter(model, adapter_dir) if adapter_dir is not None else model
        self.model.eval()

    @torch.inference_mode()
    def transcribe(self, images: list, prompt: str, max_new_tokens: int, no_repeat_ngram_size: int = 0) -> list[str]:
        inputs, width = self.family.generation_inputs(self.processor, images, prompt)
        inputs = to_device(inputs, self.device, self.dtype)
        tok = self.processor.tokenizer
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                  no_repeat_ngram_size=no_repeat_ngram_size or None,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


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


def infer_documents(model: LocalModel, image_paths: list[Path], out_dir: str | Path, prompt: str,
                    max_new_tokens: int, batch_size: int = 1, no_repeat_ngram_size: int = 0) -> list[Path]:
    """Write one `{doc}.md` per document as soon as all its pages are transcribed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups = group_pages(image_paths)
    bar = tqdm(total=sum(map(len, groups.values())), desc="infer", unit="page")
    for doc, pages in groups.items():
        texts = [t for _, t in transcribe_paths(model, pages, prompt, max_new_tokens, batch_size,
                                                no_repeat_ngram_size, progress=False)]
        bar.update(len(pages))
        path = out_dir / f"{doc}.md"
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
        tmp.replace(path)  # atomic: a reader never sees half a document
        written.append(path)
    bar.close()
    return written
