"""Character and word error rates (jiwer) after one documented normalisation."""

from __future__ import annotations

import statistics
import unicodedata

import jiwer


def normalize_text(text: str) -> str:
    """NFC (Korean typed as NFD otherwise scores CER > 2), whitespace runs collapsed, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text or "").split())


def cer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:  # jiwer returns len(hyp) here; an empty page read as empty is perfect, anything else wrong
        return 0.0 if not hyp else 1.0
    return float(jiwer.cer(ref, hyp))


def wer(reference: str, hypothesis: str) -> float:
    ref, hyp = normalize_text(reference), normalize_text(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    return float(jiwer.wer(ref, hyp))


def summarize(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "median": None, "n": 0}
    return {"mean": round(statistics.fmean(values), 4), "median": round(statistics.median(values), 4),
            "n": len(values)}
