"""Metrics of the synthetic task (pure functions, no torch): exact match, ANLS, aggregation.

* ``exact_match``: the synthetic set's scorer as a float, 1.0 where ``synth.answers_match`` holds
  (one comparison; ``synth/match.py`` has its normalisation).
* ``anls``: DocVQA's ANLS, the one implementation in ``scoring/anls.py`` (captions are scored with it).

The benchmarks' rules (VQA accuracy, relaxed accuracy, choice extraction, ...) live in ``scoring/``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from smolvlm.evaluation.scoring.anls import ANLS_THRESHOLD, anls, levenshtein
from smolvlm.synth.match import answers_match, normalize_answer

__all__ = ["ANLS_THRESHOLD", "METRICS", "aggregate", "anls", "exact_match", "levenshtein", "normalize_answer"]


def exact_match(pred: str, gold: str) -> float:
    """1.0 when ``pred`` and ``gold`` are the same answer after ``normalize_answer``, else 0.0."""
    return 1.0 if answers_match(pred, gold) else 0.0


METRICS = {"exact_match": exact_match, "anls": anls}


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def aggregate(records: Iterable[tuple[str, float]]) -> dict[str, Any]:
    """``(category, score)`` pairs -> ``{"overall", "macro", "n", "per_category": {cat: {"score", "n"}}}``.

    ``overall`` is the micro average (every record weighs the same), ``macro`` the mean of the
    category scores; both are ``None`` for no records. Categories keep first-seen order.
    """
    by_cat: dict[str, list[float]] = {}
    all_scores: list[float] = []
    for cat, score in records:
        by_cat.setdefault(cat, []).append(float(score))
        all_scores.append(float(score))
    per = {c: {"score": _mean(s), "n": len(s)} for c, s in by_cat.items()}
    return {"overall": _mean(all_scores), "macro": _mean([v["score"] for v in per.values()]),
            "n": len(all_scores), "per_category": per}
