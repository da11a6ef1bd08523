"""`ocr-finetune` command line: the same library calls the DVC stages make."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .params import ParamsError, load_params


def _params(args):
    """params.yaml (or --params), then a train config (train --config), then --mode and --set. Without a
    params.yaml where none was named, the built-in defaults: every command works from any folder."""
    from .params import Params

    seed = args.params == DEFAULT_PARAMS and not Path(DEFAULT_PARAMS).exists()
    params = Params() if seed else load_params(args.params)
    config = getattr(args, "train_config", None)
    if config is not None:
        from .seed_config import load_train_config

        if config != DEFAULT_TRAIN_CONFIG or Path(config).is_file():
            params = load_train_config(config, params)
            seed = True
    if args.command == "infer" and getattr(args, "config", None):  # a teacher config, then -S over it
        from .seed_config import load_teacher_config

        params, args.teacher_output = load_teacher_config(args.config, params)
    overrides = list(getattr(args, "set", None) or [])
    if getattr(args, "engine", None):
        overrides.insert(0, f"runtime.engine={args.engine}")
    if getattr(args, "mode", None) and args.command != "inspect":
        overrides.insert(0, f"lora.mode={args.mode}")
    if seed and args.command == "train":
        # the seed README's defaults, where its config (or no params.yaml) is in use: flags and --set win
        given = {o.split("=", 1)[0] for o in overrides}
        overrides[:0] = [f"{k}={v}" for k, v in SEED_TRAIN_DEFAULTS.items() if k not in given]
    return apply_overrides(params, overrides)


DEFAULT_PARAMS = "params.yaml"
DEFAULT_TRAIN_CONFIG = "config/train_config.yaml"  # the seed README's path: read when it exists
SEED_TRAIN_DEFAULTS = {"lora.mode": "vision", "train.output_dir": "models/finetuned"}


def apply_overrides(params, overrides: list[str]):
    """`section.key=value` pairs (as in `dvc exp run -S`), applied together and then validated like
    params.yaml (together, so that e.g. a family and its resolution can change in one command)."""
    import yaml

    from .params import validate_params

    if not overrides:
        return params
    raw = params.model_dump()
    for override in overrides:
        if "=" not in override or "." not in override.split("=", 1)[0]:
            raise ParamsError(f"--set {override!r}: expected section.key=value")
        key, value = override.split("=", 1)
        *sections, name = key.split(".")  # teacher.api.base_url: as deep as params go
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ParamsError(f"--set {override!r}: {section} is a value, not a section")
        node[name] = yaml.safe_load(value)
    return validate_params(raw, "--set " + " ".join(overrides))


def cmd_pdf2img(args):
    from .pdf import render_pages

    m = render_pages(args.pdf, args.output, dpi=args.dpi, fmt=args.format, start_page=args.start_page,
                     end_page=args.end_page, workers=args.workers, max_pixels=args.max_pixels)
    # each skipped PDF or page was reported as it was met
    print(f"rendered {len(m.pages)} pages to {args.output}; skipped {len(m.skipped)} PDFs or pages")
    if not m.pages and not m.skipped:
        raise ParamsError(f"{args.pdf}: no PDF found (files ending in .pdf, subfolders included)")
    return 0 if m.pages else 1


def cmd_infer(args):
    """Pages in, one file per document out, with the teacher of the params in effect (`teacher.kind`, after
    --config and -S), or the local model when --adapter names a fine-tuned adapter."""
    from .infer import image_pages, infer_documents
    from .teachers.base import PageLabel
    from .teachers import get_teacher
    from .teachers.prompts import teacher_prompts

    params = _params(args)  # params.yaml, then --config, then -S
    output = getattr(args, "teacher_output", {})
    fmt = args.format or output.get("format", "md")
    if args.task:
        params.teacher.task = args.task
    if args.adapter:  # a fine-tuned adapter is read by the local model, whatever teacher.kind says
        params.teacher.kind = "local"
        params.teacher.local.adapter = args.adapter
    if args.max_new_tokens:
        params.teacher.local.max_new_tokens = params.teacher.api.max_tokens = args.max_new_tokens
    if args.batch_size is not None:
        params.teacher.local.batch_size = args.batch_size
    if args.list_prompts:
        for task, prompt in teacher_prompts(params.teacher).items():
            print(f"{task}: {prompt.user!r}" + (f" (system: {prompt.system[:60]!r}...)" if prompt.system else ""))
        return 0
    if not (args.pdf or args.images):
        raise ParamsError("infer needs --pdf FILE_OR_DIR or --images FILE_OR_DIR")
    out = Path(args.output)
    failed = []  # pages that could not be rendered: their documents show where text is missing
    if args.pdf:
        from .pdf import render_pages, source_pdf
        from .teachers.base import PageInput

        dpi = args.dpi if args.dpi is not None else params.pdf2img.dpi
        from .engines import page_mapper

        manifest = render_pages(args.pdf, out / "pages", dpi=dpi, workers=params.pdf2img.workers,
                                max_pixels=params.pdf2img.max_pixels, map_pages=page_mapper(params))  # skipped PDFs and pages reported there
        pages = [PageInput(p.doc, p.page, out / "pages" / p.image, source_pdf(args.pdf, p)) for p in manifest.pages]
        failed = [PageLabel(s["doc"], s["page"], "", "failed", reason=f"not rendered: {s['reason']}")
                  for s in manifest.skipped if "page" in s]
    else:
        try:
            pages, others = image_pages(args.images, out / "pages")
        except (FileNotFoundError, ValueError) as e:
            raise ParamsError(f"--images: {e}") from None
        if others:
            shown = ", ".join(str(p) for p in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            print(f"skipped {len(others)} files that are not images Pillow reads: {shown}")
    if not pages:
        raise ParamsError("no page images to transcribe" + ("" if args.pdf else
                          " (any image format Pillow reads: PNG, JPEG, TIFF, WebP, BMP, GIF...)"))
    teacher = get_teacher(params)
    print(f"transcribing {len(pages)} pages with teacher {params.teacher.kind}" + (
        f" ({params.model.base}" + (f" + adapter {params.teacher.local.adapter}" if params.teacher.local.adapter
                                    else "") + ")" if params.teacher.kind == "local" else ""), flush=True)
    if params.teacher.kind == "local" and params.model.base == "tiny":
        print("WARNING: model.base is `tiny`, a random model built for tests: its output is noise. Name a real "
              "checkpoint (-S model.base=deepseek-community/DeepSeek-OCR-2) or another teacher "
              "(-S teacher.kind=pdf_text, or --config config/teacher_api.yaml).", file=sys.stderr, flush=True)
    written = infer_documents(teacher, pages, out, fmt=fmt, failed=failed)
    print(f"wrote {len(written)} documents ({fmt}) to {out}")
    if args.pdf and output.get("save_images") is False:  # the seed config's output.save_images: false
        import shutil

        shutil.rmtree(out / "pages", ignore_errors=True)
    usage = getattr(teacher, "usage", None)
    if usage is not None:
        print("requests:", usage.summary())
    if written.failed:  # what succeeded is written; a script or `make` must still see that pages are missing
        print(f"{written.failed} of {written.pages} pages failed: their documents (or the lines above) say why")
        return 1
    return 0


def cmd_train(args):
    from . import distributed
    from .tracking import start_run
    from .train import final_loss, train

    params = _params(args)
    distributed.relaunch(params.train, ["-m", "ocr_finetune.cli", *args.argv])
    if args.output:
        params.train.output_dir = args.output
    if args.resume:
        params.train.resume = "require"
    with start_run(params.tracking, run_name=f"lora-{params.lora.mode}", params=params) as tracker:
        result = train(params, args.dataset, tracker=tracker, metrics_dir=args.metrics_dir)
    if distributed.process_rank() == 0:
            print(f"adapter saved to {result.adapter_dir} ({result.trainable_params:,} trainable parameters, "
              f"{result.steps} steps on {result.num_gpus} process(es), {result.pages_per_second:.2f} pages/s "
              f"steady, {result.whole_pages_per_second:.2f} over the whole loop, waiting for data "
              f"{result.data_wait_fraction:.0%} of it; final loss {final_loss(result.losses):.4f}, the mean of "
              "the last tenth of the steps)")
    return 0


def cmd_evaluate(args):
    import json

    from .evaluate import evaluate_adapter

    params = _params(args)
    prompt = None
    if args.task:  # the prompts file's task, as the model's prompt (default: the dataset's own prompt)
        from .teachers.prompts import get_prompt

        user = get_prompt(params.teacher.prompts_file, args.task).user
        prompt = user if "<image>" in user else f"<image>\n{user}"
    result = evaluate_adapter(params, args.dataset, None if args.base_only else args.adapter,
                              metrics_dir=args.metrics_dir, prompt=prompt, seen_jsonl=args.seen)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=2))
    return 0


def cmd_export(args):
    from .export import export_merged, export_vllm_lora

    params = _params(args)
    if args.format == "merged":
        out = export_merged(params, args.adapter, args.output)
    else:
        out = export_vllm_lora(args.adapter, args.output)
    print(f"exported {args.adapter} as {args.format} to {out}")
    return 0


def cmd_inspect(args):
    from .inspect import describe_lora

    params = _params(args)
    print(describe_lora(params, modes=[args.mode] if args.mode else None, list_modules=args.modules))
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ocr-finetune")
    except PackageNotFoundError:  # run from a checkout that was never installed (python main.py)
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    from .params import Pdf2ImgParams

    ap = argparse.ArgumentParser(prog="ocr-finetune", description=__doc__)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)

    def with_engine(p):
        p.add_argument("--engine", choices=["local", "ray"],
                       help="where pages are transcribed: this process (local) or a Ray cluster (ray; joins "
                            "$RAY_ADDRESS or runtime.ray_address, else starts one here). Default: runtime.engine")

    def with_params(p):
        p.add_argument("--params", default=DEFAULT_PARAMS,
                       help="params file (default: params.yaml; built-in defaults where there is none)")
        p.add_argument("--set", "-S", action="append", metavar="SECTION.KEY=VALUE",
                       help="override one param, validated like params.yaml (repeatable)")
        return p

    p = sub.add_parser("pdf2img", help="render PDF pages to images")
    p.add_argument("--source", "--pdf", dest="pdf", required=True, help="a PDF file or a directory of PDFs")
    p.add_argument("--output", "-o", default="./output_images", help="default: ./output_images")
    p.add_argument("--dpi", type=int, default=200, help="resolution of the page images, 10 to 1200 (default: 200)")
    p.add_argument("--format", choices=["png", "jpg"], default="png", help="image format (default: png)")
    p.add_argument("--start-page", type=int, default=1, help="first page of each PDF, from 1 (default: 1)")
    p.add_argument("--end-page", type=int, default=None, help="last page of each PDF (default: its last)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering pages in parallel (default: 2)")
    p.add_argument("--max-pixels", type=_positive_int, default=Pdf2ImgParams().max_pixels,
                   help="pixels per page at most; a larger page is rendered at the dpi that fits "
                        "(default: %(default)s, as pdf2img.max_pixels)")
    p.set_defaults(func=cmd_pdf2img)

    p = with_params(sub.add_parser("infer", help="transcribe PDFs or page images to Markdown, one file per document"))
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pdf", help="a PDF file or a directory of PDFs")
    src.add_argument("--images", help="a directory of page images ({doc}_p{N}.png)")
    p.add_argument("--output", "-o", default="./output", help="default: ./output")
    p.add_argument("--config", help="a teacher config, in the seed README's shape (config/examples/"
                                    "teacher_api.example.yaml) or as params sections (teacher_api.params.example.yaml);"
                                    " -S overrides it")
    p.add_argument("--task", help="the prompt task (see --list-prompts)")
    p.add_argument("--list-prompts", action="store_true", help="list the tasks of the prompts file and exit")
    p.add_argument("--format", choices=["md", "jsonl", "json"], default=None,
                   help="md: the document; json: pages with status; jsonl: training records")
    p.add_argument("--adapter", help="a LoRA adapter: transcribe with the local model and it (else teacher.kind)")
    p.add_argument("--dpi", type=int, default=None,
                   help=f"resolution --pdf pages are rendered at (default: pdf2img.dpi of the params, "
                        f"{Pdf2ImgParams().dpi} built in)")
    p.add_argument("--max-new-tokens", type=int, help="tokens a page's transcription may take at most (default: "
                                                       "teacher.local.max_new_tokens / teacher.api.max_tokens)")
    p.add_argument("--batch-size", type=_positive_int,
                   help="pages decoded together by the local model (GPU throughput grows up to 64-128)")
    with_engine(p)
    p.set_defaults(func=cmd_infer)

    p = with_params(sub.add_parser("train", help="LoRA fine-tune on a JSONL dataset"))
    p.add_argument("--dataset", default="data/dataset/train.jsonl", help="default: %(default)s")
    p.add_argument("--mode", choices=["vision", "llm", "both"],
                   help="LoRA mode (default: lora.mode of params.yaml; vision with a train config or no params.yaml)")
    p.add_argument("--config", dest="train_config", default=DEFAULT_TRAIN_CONFIG,
                   help="a train config, the seed's shape or params sections (default: config/train_config.yaml "
                        "where it exists; config/examples/train_config.example.yaml shows it)")
    p.add_argument("--output", help="adapter directory (default: train.output_dir of params.yaml; ./models/finetuned "
                                    "with a train config or no params.yaml)")
    p.add_argument("--metrics-dir", default=None, help="write train.json and train_loss.csv here (default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run from its last checkpoint (error if there is none)")
    p.set_defaults(func=cmd_train)

    p = with_params(sub.add_parser("evaluate", help="base vs fine-tuned CER/WER on a JSONL dataset"))
    p.add_argument("--dataset", default="data/dataset/eval.jsonl", help="default: %(default)s")
    p.add_argument("--adapter", default="models/adapter", help="the LoRA adapter to score (default: %(default)s)")
    p.add_argument("--base-only", action="store_true", help="score the base model alone, without an adapter")
    p.add_argument("--task", help="prompt task from teacher.prompts_file (default: the dataset's prompt)")
    p.add_argument("--output", help="write the full result (per page) as JSON")
    p.add_argument("--metrics-dir", default=None,
                   help="write eval.json and the per-document and per-page metrics here (default: none)")
    p.add_argument("--seen", metavar="JSONL",
                   help="the adapter's training set: up to evaluate.seen_pages of its pages are scored apart, "
                        "to show what it learned beside the held-out scores")
    with_engine(p)
    p.set_defaults(func=cmd_evaluate)

    p = with_params(sub.add_parser("inspect", help="LoRA targets and trainable parameters per mode"))
    p.add_argument("--mode", choices=["vision", "llm", "both"], help="one LoRA mode (default: all three)")
    p.add_argument("--modules", action="store_true", help="list every targeted module")
    p.set_defaults(func=cmd_inspect)

    p = with_params(sub.add_parser("export", help="merge an adapter into full weights, or export it for vLLM"))
    p.add_argument("--adapter", default="models/adapter", help="the LoRA adapter to export (default: %(default)s)")
    p.add_argument("--output", "-o", default="models/export", help="default: %(default)s")
    p.add_argument("--format", choices=["merged", "vllm-lora"], default="merged",
                   help="merged: full weights (any LoRA mode); vllm-lora: an `llm` adapter under vLLM's names")
    p.set_defaults(func=cmd_export)
    return ap


def user_error(e: BaseException, interrupted_hint: str = "") -> str | None:
    """One line for what the user can fix (a param, a path, a file, Ctrl-C), None for a bug (its traceback
    is kept). The CLI and the DVC stages both report through this."""
    from .checkpoint import CheckpointError
    from .dataset import DatasetError
    from .models.base import ModelLoadError

    if isinstance(e, KeyboardInterrupt):
        return f"interrupted{interrupted_hint}"
    if isinstance(e, (ParamsError, FileNotFoundError, ValueError, DatasetError, ModelLoadError, CheckpointError)):
        return f"error: {e}"
    if isinstance(e, OSError) and e.filename is not None:  # an --output that is a file, a folder not writable
        return f"error: {e.filename}: {e.strerror}"
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train` re-runs itself under torchrun with the same arguments
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:
        hint = {cmd_infer: ": run the same command again to go on (answered pages are cached)",
                cmd_train: ": `train --resume` goes on from the last checkpoint"}.get(args.func, "")
        message = user_error(e, hint)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 2


if __name__ == "__main__":
    sys.exit(main())
