"""Page images -> Markdown with a local model (base, or base + LoRA adapter)."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from transformers import LogitsProcessorList

from .decoding import WindowedNoRepeatNGram, decode_generated, exempt_ids
from .lora import load_adapter
from .models.base import load_image
from .dataset import escapes, make_record
from .params import DEFAULT_PROMPT, Params
from .teachers.base import PageInput, PageLabel
from .files import write_text_atomic
from .pdf import list_files, parse_page_image_name, readable
from .runtime import pick_device, pick_dtype
from .data import PromptPages, WaitClock, default_workers, generation_batches, to_device
from .loading import adapter_params, load_base


STATIC_CACHE_BUCKET = 256  # tokens: the static KV cache's length is a multiple of this


class LocalModel:
    """A loaded model ready to transcribe: the family's functions, the model and its processor."""

    def __init__(self, params: Params, adapter_dir: str | Path | None = None, device: str = "auto",
                 static_cache: bool | None = None):
        self.device = pick_device(device)
        self.dtype = pick_dtype(params.train.dtype, self.device)
        self.workers = params.evaluate.num_workers
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
        self.data_wait_fraction = 0.0  # share of the last stream() spent waiting for pages to be prepared
        self.first_wait_s = None  # of that, seconds waited for the first batch

    def transcribe(self, images: list, prompt: str, max_new_tokens: int, no_repeat_ngram_size: int = 0,
                   no_repeat_window: int = 90) -> list[str]:
        return [text for text, _ in self.generate(images, prompt, max_new_tokens, no_repeat_ngram_size,
                                                  no_repeat_window)]

    def generate(self, images: list, prompt: str, max_new_tokens: int,
                 no_repeat_ngram_size: int = 0, no_repeat_window: int = 90) -> list[tuple[str, str]]:
        """Greedy transcriptions of a batch of page images, each with its finish reason (`stop` or `length`)."""
        inputs, width = self.family.generation_inputs(self.processor, images, prompt)
        return self.generate_batch(inputs, width, max_new_tokens, no_repeat_ngram_size, no_repeat_window)

    @torch.inference_mode()
    def generate_batch(self, inputs: dict, width: int, max_new_tokens: int,
                       no_repeat_ngram_size: int = 0, no_repeat_window: int = 90) -> list[tuple[str, str]]:
        """generate() on inputs already prepared (data.generation_batches): greedy, with the official no-repeat
        guard when `no_repeat_ngram_size` > 0, decoded as the official code decodes (decoding.py)."""
        inputs = to_device(inputs, self.device, self.dtype)
        tok = self.processor.tokenizer
        static = {}
        if self.static_cache:
            # The compiled decoding step is specialised to the cache's length. Pages of other shapes (tilings)
            # give other prompt widths; sized to the exact width, each new width would compile anew (tens of
            # seconds, and eager decoding past torch's recompile limit). Rounded up to STATIC_CACHE_BUCKET, and
            # transformers never shrinks it between calls, so a corpus compiles a few times at most.
            need = width + max_new_tokens
            static = {"cache_implementation": "static",
                      "max_cache_len": -(-need // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET}
        guard = LogitsProcessorList()
        if no_repeat_ngram_size:
            guard.append(WindowedNoRepeatNGram(no_repeat_ngram_size, no_repeat_window, width, exempt_ids(tok)))
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=guard,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **static)
        results = []
        for row in out[:, width:].cpu():
            text, stopped = decode_generated(tok, row)
            results.append((text, "stop" if stopped else "length"))
        return results

    def stream(self, images: list, prompt: str, max_new_tokens: int, batch_size: int = 1,
               no_repeat_ngram_size: int = 0, progress: bool = True, no_repeat_window: int = 90,
               desc: str = "transcribe", answers=None) -> Iterator[tuple[int, str | None, str]]:
        """Transcribe page image files in the batches of data.batch_plan, reading and preprocessing them in
        worker processes while the GPU decodes the batch before. Yields (index into images, text, finish
        reason) as batches finish, and (index, None, reason) for a page that could not be read: it fails alone.
        `answers` (teachers.cache.Answers): each answer is stored there before it is yielded."""
        dataset = PromptPages(list(images), self.family, self.processor, prompt, self.dtype)
        batches = generation_batches(dataset, batch_size, default_workers(self.workers),
                                     self.device.startswith("cuda"))
        clock = WaitClock()
        bar = tqdm(total=len(dataset), desc=desc, unit="page", disable=not progress)
        for batch in clock.iterate(batches):
            for i, reason in batch.failures:
                bar.update(1)
                yield i, None, reason
            if batch.inputs is not None:
                results = self.generate_batch(batch.inputs, batch.width, max_new_tokens, no_repeat_ngram_size,
                                              no_repeat_window)
                if answers is not None:
                    for i, (text, finish) in zip(batch.indices, results):
                        answers.put(answers.keys[i], text, finish)
                bar.update(len(results))
                yield from ((i, text, finish) for i, (text, finish) in zip(batch.indices, results))
            self.data_wait_fraction, self.first_wait_s = clock.fraction, clock.first_wait
            bar.set_postfix(data_wait=f"{clock.fraction:.0%}")
        bar.close()


def transcribe_paths(model: LocalModel, paths: Iterable[Path], prompt: str, max_new_tokens: int,
                     batch_size: int = 1, no_repeat_ngram_size: int = 0, no_repeat_window: int = 90,
                     progress: bool = True) -> Iterator[tuple[Path, str]]:
    """(path, text) for every page; a page that cannot be read raises (evaluate needs every page)."""
    paths = list(paths)
    for i, text, finish in model.stream(paths, prompt, max_new_tokens, batch_size, no_repeat_ngram_size, progress,
                                        no_repeat_window):
        if text is None:
            raise ValueError(f"{paths[i]}: {finish}")
        yield paths[i], text


def _readable_suffixes() -> set[str]:
    from PIL import Image

    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_pages(source: str | Path, frames_dir: str | Path) -> tuple[list[PageInput], list[Path]]:
    """The pages of `--images`: a file or a folder with its subfolders, every image format Pillow reads.
    Documents: `{doc}_p{N}.{ext}` files are pages of `doc` in numeric order, any other image is a one-page
    document named after it, a multi-page TIFF a document of its frames (written to `frames_dir` as PNGs);
    files in subfolders get the folder in their name (`2024/scan.png` -> `2024__scan`), as PDFs do.
    Returns the pages and the files that are not images. Two files for one page (`scan.png` beside
    `scan.jpg`, `a_p1.png` beside `a_p01.png`) or documents whose names differ only by case are refused:
    their transcriptions would land in one file."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    suffixes = _readable_suffixes()
    files = list_files(source, lambda name: True)
    root = source.parent if source.is_file() else source
    pages, others, owner, docs = [], [], {}, {}
    for path in files:
        if path.suffix.lower() not in suffixes:
            others.append(path)
            continue
        rel = path.relative_to(root)
        parsed = parse_page_image_name(rel.name)
        doc, page = parsed if parsed else (Path(rel.name).stem, 1)
        doc = "__".join([*rel.parent.parts, doc])
        images = [(page, path)]
        if path.suffix.lower() in (".tif", ".tiff") and not parsed:
            images = _tiff_frames(path, doc, Path(frames_dir)) or images
        for page, image in images:
            if (doc, page) in owner:
                raise ValueError(f"{owner[doc, page]} and {path} are both page {page} of document {doc!r}: "
                                 "rename one of them")
            if docs.setdefault(doc.casefold(), doc) != doc:
                raise ValueError(f"documents {docs[doc.casefold()]!r} and {doc!r} differ only by case and would "
                                 "share one output file where names ignore case: rename one of them")
            owner[doc, page] = path
            pages.append(PageInput(doc, page, image))
    return sorted(pages, key=lambda p: (p.doc, p.page)), others


def _tiff_frames(path: Path, doc: str, frames_dir: Path) -> list[tuple[int, Path]]:
    """A multi-page TIFF (how scanners save a document) as one PNG per frame; [] for a one-page file or one
    that does not open (its page then fails with the reason)."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) < 2:
                return []
            frames_dir.mkdir(parents=True, exist_ok=True)
            out = []
            for i, frame in enumerate(ImageSequence.Iterator(im), start=1):
                target = frames_dir / f"{doc}_p{i}.png"
                frame.convert("RGBA" if "A" in frame.mode else "RGB").save(target)  # CMYK has no PNG
                out.append((i, target))
            return out
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        print(f"note: {path}: its pages could not be split ({type(e).__name__}: {e}); read as one page", flush=True)
        return []


class Written(list):
    """The files `infer_documents` wrote, in order; `pages`: the pages asked for, `failed`: those without a
    transcription in them (the page failed, or its document could not be written)."""

    def __init__(self, pages: int):
        super().__init__()
        self.pages, self.failed = pages, 0


def infer_documents(teacher, pages: list[PageInput], out_dir: str | Path, fmt: str = "md",
                    progress: bool = True, failed: Iterable[PageLabel] = ()) -> Written:
    """Transcribe pages with any teacher; write each document the moment its last page is answered, so
    finished documents can be opened while the run goes on. `failed`: pages that never reached the teacher
    (not rendered), shown in their documents as missing. A document that cannot be written (its name too long
    for the file system, a full disk) is reported and counted failed; the others go on."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = list(failed)
    expected = Counter(p.doc for p in pages) + Counter(x.doc for x in failed)
    done: dict[str, list[PageLabel]] = defaultdict(list)
    for x in failed:
        done[x.doc].append(x)
    written = Written(len(pages) + len(failed))
    for doc in sorted({x.doc for x in failed} - {p.doc for p in pages}):  # no page rendered
        _write_or_report(written, doc, done.pop(doc), pages, out_dir, fmt)
    bar = tqdm(total=len(pages), desc=f"infer ({teacher.name})", unit="page", disable=not progress)
    for label in teacher.label(pages):
        bar.update(1)
        done[label.doc].append(label)
        if len(done[label.doc]) == expected[label.doc]:
            _write_or_report(written, label.doc, done.pop(label.doc), pages, out_dir, fmt)
            wait = getattr(teacher, "data_wait_fraction", None)  # the local model: time it waited for pages
            bar.set_postfix(docs=len(written), **({"data_wait": f"{wait:.0%}"} if wait is not None else {}))
    bar.close()
    return written


def _write_or_report(written: Written, doc: str, labels: list[PageLabel], pages: list[PageInput], out_dir: Path,
                     fmt: str) -> None:
    labels = sorted(labels, key=lambda x: x.page)
    try:
        written.append(write_document(doc, labels, pages, out_dir, fmt))
    except (OSError, UnicodeEncodeError) as e:  # this document's name or the disk, not the run
        written.failed += len(labels)
        tqdm.write(f"failed {readable(doc)}: not written ({getattr(e, 'strerror', None) or e})")
        return
    written.failed += sum(1 for x in labels if x.status == "failed")


def record_image(image: Path, out_dir: Path, doc: str, page: int) -> str:
    """The page image as a training record names it: relative to the JSONL. A dataset may only name images in
    its own tree (dataset.escapes), so a page from elsewhere (`--images ~/scans`) is copied into OUT/pages."""
    rel = Path(os.path.relpath(image, out_dir)).as_posix()
    if not escapes(rel):
        return rel
    name = f"{doc.replace('/', '_')}_p{page}{image.suffix}"  # two folders may hold files of one name
    copy = out_dir / "pages" / name
    copy.parent.mkdir(parents=True, exist_ok=True)
    if not copy.exists() or not os.path.samefile(copy, image):
        shutil.copy2(image, copy)
    return f"pages/{name}"


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
        rows = [make_record(record_image(images[(doc, x.page)], out_dir, doc, x.page), DEFAULT_PROMPT, x.text, doc, x.page)
                for x in labels if x.status == "labeled"]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    write_text_atomic(path, text)  # a reader never sees half a document
    return path
