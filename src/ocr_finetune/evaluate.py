"""Base model vs fine-tuned adapter on the eval split: scores per page, per document and overall, and the
HTML report (metrics.py says what each score is; params `evaluate.*` set the normalisation)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path

from .dataset import read_jsonl
from .engines import transcriber
from .infer import transcribe_paths
from .metrics import page_scores, summarize_system
from .models.base import write_json
from .params import Params
from .report import write_report
from .teachers.quality import clean_output
from .tracking import Tracker, flatten
from .loading import adapter_params


def evaluate(params: Params, eval_jsonl: str | Path, adapter_dir: str | Path | None,
             metrics_dir: str | Path | None = None, tracker: Tracker | None = None, progress: bool = True,
             prompt: str | None = None, seen_jsonl: str | Path | None = None) -> dict:
    """Scores of the held-out pages (`eval_jsonl`; the summary's top-level keys) and, when `seen_jsonl` (the
    training split) is given, of up to `evaluate.seen_pages` of the pages the adapter trained on, apart
    (`summary["seen"]`): a small corpus cannot teach a model to generalise, but it must show that it learned."""
    ep = params.evaluate
    examples = read_jsonl(eval_jsonl)
    if not examples:
        raise ValueError(f"{eval_jsonl} has no examples to evaluate: build_dataset holds whole documents out "
                         "for evaluation (dataset.eval_fraction), and a corpus of one document (or a fraction too "
                         "small for one) has none to hold out; add documents")
    seen = seen_sample(read_jsonl(seen_jsonl), ep.seen_pages) if seen_jsonl is not None else []
    prompt = prompt or examples[0].prompt
    systems = {"base": None}
    if adapter_dir is not None:
        systems["finetuned"] = adapter_dir
        # The base model reads the pages as the adapter was trained to (its family, base and resolution), so
        # the two differ by the adapter alone.
        params = adapter_params(params, adapter_dir)
    every = examples + seen
    outputs: dict[str, list[str]] = {}
    for name, adapter in systems.items():
        model = transcriber(params, adapter_dir=adapter, device=params.train.device)  # runtime.engine
        by_path = dict(transcribe_paths(model, [e.image for e in every], prompt, ep.max_new_tokens,
                                        ep.batch_size, ep.no_repeat_ngram_size, progress=progress,
                                        no_repeat_window=ep.no_repeat_window))
        outputs[name] = [by_path[e.image] for e in every]
        del model

    pages = score_pages(every, outputs, ep)
    for i, p in enumerate(pages):
        p["split"] = "held_out" if i < len(examples) else "seen"
    held = [p for p in pages if p["split"] == "held_out"]
    summary = summarize(held, systems)
    if seen:
        summary["seen"] = summarize([p for p in pages if p["split"] == "seen"], systems)

    per_doc = defaultdict(list)
    for p in pages:
        per_doc[p["split"], p["doc"]].append(p)
    doc_rows = [{"doc": doc, "split": split,
                 **{f"{name}_{k}": round(statistics.fmean(r[name][k] for r in rows), 4)
                    for name in systems for k in ("cer", "cer_clipped", "wer", "ned")}}
                for (split, doc), rows in sorted(per_doc.items())]
    result = {"summary": summary, "per_doc": doc_rows, "pages": pages, "normalization": normalization(ep),
              "model": {k: getattr(params.model, k) for k in ("family", "base", "resolution")},
              "adapter": str(adapter_dir) if adapter_dir is not None else None,
              "mlflow_run_id": tracker.run_id if tracker is not None else None}
    if metrics_dir is not None:
        metrics_dir = Path(metrics_dir)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        write_json(metrics_dir / "eval.json", summary)
        # long format, one bar per (document, system): what `dvc plots` draws as a horizontal bar chart
        write_json(metrics_dir / "eval_per_doc.json",
                   [{"doc_system": f"{r['doc']}{' (trained on)' if r['split'] == 'seen' else ''} [{name}]",
                     "doc": r["doc"], "split": r["split"], "system": name,
                     "cer_clipped": r[f"{name}_cer_clipped"], "ned": r[f"{name}_ned"]}
                    for r in doc_rows for name in systems])
        with (metrics_dir / "eval_pages.jsonl").open("w", encoding="utf-8") as f:
            for p in pages:
                f.write(json.dumps(p, ensure_ascii=False) + "\n")
        write_report(result, metrics_dir / "report.html")
    if tracker is not None:
        # the names metrics/eval.json has in `dvc exp show` (`base.cer`, `seen.finetuned.cer`, `cer_change`)
        tracker.log_metrics({k: v for k, v in flatten(summary).items() if isinstance(v, (int, float))})
        if metrics_dir is not None:
            tracker.log_artifact(Path(metrics_dir) / "report.html")
    return result


def summarize(pages: list[dict], systems) -> dict:
    summary = {"pages": len(pages), "docs": len({p["doc"] for p in pages})}
    for name in systems:
        summary[name] = summarize_system([p[name] for p in pages])
    if "finetuned" in systems:
        summary["cer_change"] = round(summary["finetuned"]["cer"] - summary["base"]["cer"], 4)
        summary["ned_change"] = round(summary["finetuned"]["ned"] - summary["base"]["ned"], 4)
        # a base model that loops on one page can dominate the raw mean; the clipped mean cannot
        summary["cer_clipped_change"] = round(summary["finetuned"]["cer_clipped"] - summary["base"]["cer_clipped"], 4)
    return summary


def seen_sample(examples: list, n: int) -> list:
    """Up to n of the training pages, spread evenly over the split (documents follow each other in it)."""
    if n <= 0 or not examples:
        return []
    if len(examples) <= n:
        return list(examples)
    step = (len(examples) - 1) / max(n - 1, 1)
    return [examples[round(i * step)] for i in range(n)]


def normalization(ep) -> dict:
    return {"unicode": ep.unicode, "collapse_whitespace": ep.collapse_whitespace, "markdown": ep.markdown}


def score_pages(examples: list, outputs: dict[str, list[str]], ep) -> list[dict]:
    """One row per page: its reference and each system's output and scores. Outputs are cleaned as `infer`
    cleans them (grounding tags, special tokens, a wrapping fence): the labels have none of these, so scoring
    them would charge the base model for its output format, not its reading. The raw text is kept beside."""
    norm = normalization(ep)
    pages = []
    for i, e in enumerate(examples):
        row = {"doc": e.doc, "page": e.page, "image": str(e.image), "reference": e.target}
        for name, texts in outputs.items():
            text = clean_output(texts[i])
            row[name] = {"output": text, **({"raw_output": texts[i]} if texts[i] != text else {}),
                         **page_scores(e.target, text, ep.loop_threshold, **norm)}
        pages.append(row)
    return pages


def evaluate_adapter(params: Params, eval_jsonl: str | Path, adapter_dir: str | Path | None,
                     metrics_dir: str | Path | None = None, prompt: str | None = None, progress: bool = True,
                     seen_jsonl: str | Path | None = None) -> dict:
    """evaluate(), with the scores logged to the MLflow run that trained the adapter (when it has one)."""
    from .tracking import start_run, why_run_unavailable
    from .loading import read_run_info

    run_id = read_run_info(adapter_dir).get("mlflow_run_id") if adapter_dir is not None else None
    missing = None
    if run_id is not None and params.tracking.enabled:
        missing = why_run_unavailable(params.tracking, run_id)
    if missing:
        print(f"note: the adapter's MLflow run {run_id} {missing}: the scores are written under metrics/ only",
              flush=True)
        run_id = None
    if run_id is None:
        return evaluate(params, eval_jsonl, adapter_dir, metrics_dir, None, progress, prompt, seen_jsonl)
    with start_run(params.tracking, run_id=run_id) as tracker:
        return evaluate(params, eval_jsonl, adapter_dir, metrics_dir, tracker, progress, prompt, seen_jsonl)
