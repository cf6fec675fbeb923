"""ANLS (Average Normalized Levenshtein Similarity), DocVQA's metric.

Follows VK ``vlmeval/dataset/utils/vqa_eval.py::anls_compute`` + ``hit_calculate`` (DocVQA branch)
and LE ``lmms_eval/api/metrics.py::anls``; the two compute the same thing:

* both sides: ``" ".join(s.strip().lower().split())`` (lower-case, whitespace collapsed);
* distance = Levenshtein(normalised gold, normalised prediction) divided by
  ``max(len(gold.upper()), len(prediction.upper()))`` -- the lengths of the *raw* strings (before the
  whitespace collapse; ``.upper()`` can lengthen a string, e.g. ``"ß"`` -> ``"SS"``). Both references
  do this (EVAL.md calls it an LE quirk; VK's ``anls_compute`` has it too);
* score = ``1 - min(distance over golds)``, set to 0 when below the threshold (0.5). A score of exactly
  0.5 is kept (``< 0.5`` is the test in both).

LE vs VK: no difference in the rule. (VK's DocVQA prediction arrives stripped by its SmolVLM wrapper;
see ``scoring/__init__.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence

ANLS_THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert / delete / substitute, each 1), two rows."""
    if len(a) > len(b):
        a, b = b, a
    prev = list(range(len(a) + 1))
    for j, cb in enumerate(b, 1):
        cur = [j]
        for i, ca in enumerate(a, 1):
            cur.append(prev[i - 1] if ca == cb else 1 + min(prev[i - 1], prev[i], cur[i - 1]))
        prev = cur
    return prev[-1]


def anls_normalize(text: str) -> str:
    """Lower-case and collapse whitespace: what both references compare."""
    return " ".join(text.strip().lower().split())


def anls_distance(gold: str, prediction: str) -> float:
    """Normalised Levenshtein distance of one gold answer, divided by the raw strings' longer length
    (``len(s.upper())``, as VK ``anls_compute`` and LE ``anls`` do); 0.0 when both are empty."""
    length = max(len(gold.upper()), len(prediction.upper()))
    if length == 0:
        return 0.0
    return levenshtein(anls_normalize(gold), anls_normalize(prediction)) / length


def anls(prediction: str, answers: Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against its gold answers: ``1 - min distance``, 0 below ``threshold``.

    No gold answers -> 0.0 (VK would take ``np.min`` of an empty list; LE would fail on ``min``)."""
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        return 0.0
    score = 1.0 - min(anls_distance(str(g), prediction) for g in answers)
    return 0.0 if score < threshold else score


def score_docvqa(prediction: str, reference: dict) -> float:
    """DocVQA: ``anls(prediction, reference["answers"])``, threshold 0.5."""
    return anls(prediction, list(reference.get("answers") or []))


def extract_docvqa(prediction: str, reference: dict) -> str:
    """What ANLS compares: the lower-cased, whitespace-collapsed prediction."""
    return anls_normalize(prediction)
