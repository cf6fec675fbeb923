"""ChartQA relaxed accuracy (Methani et al. 2020; pix2struct's ``relaxed_correctness``).

Follows VK ``vlmeval/dataset/utils/vqa_eval.py::relaxed_correctness`` with
``process_line(method='relaxed_accuracy')`` + ``hit_calculate`` (ChartQA branch); LE
``lmms_eval/tasks/chartqa/utils.py::relaxed_correctness`` has the same rule:

* each side parses as a float (Python ``float``; a trailing ``%`` -> ``float(text.rstrip('%')) / 100``);
* when the prediction parses and the gold parses to a *non-zero* number:
  correct iff ``|pred - gold| / |gold| <= 0.05`` (5% exactly is correct);
* otherwise (either side not a number, or gold == 0): case-insensitive string equality.

So ``"45%"`` vs ``"0.45"`` is correct, ``"45%"`` vs ``"45"`` is not (0.45 vs 45); gold ``"0"`` with
prediction ``"0.0"`` is wrong (string comparison).

LE vs VK: VK strips the prediction (``line['prediction'].strip()``) and takes the max over a list of
golds; LE compares the raw prediction with the single gold, so ``" yes"`` vs ``"yes"`` is right in VK,
wrong in LE (numbers are unaffected: ``float`` ignores surrounding whitespace, but ``"5% "`` is not a
percentage in LE). **We follow VK.** (VK before 2025-09-01, commit 677e30a5, passed the arguments
swapped -- dividing by the prediction; HEAD divides by the gold, as here and LE.)
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_RELATIVE_CHANGE = 0.05


def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = MAX_RELATIVE_CHANGE) -> bool:
    """One gold: numeric within ``max_relative_change`` of a non-zero gold, else case-insensitive equality.
    The prediction is stripped first (VK)."""
    prediction, target = str(prediction).strip(), str(target)
    pred_f, target_f = _to_float(prediction), _to_float(target)
    if pred_f is not None and target_f:
        return abs(pred_f - target_f) / abs(target_f) <= max_relative_change
    return prediction.lower() == target.lower()


def relaxed_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when any gold is relaxed-correct (VK's max over the list), else 0.0 (also without golds)."""
    if isinstance(answers, str):
        answers = [answers]
    return 1.0 if any(relaxed_correctness(prediction, a) for a in answers) else 0.0


def score_chartqa(prediction: str, reference: dict) -> float:
    """ChartQA: ``relaxed_accuracy(prediction, reference["answers"])``."""
    return relaxed_accuracy(prediction, list(reference.get("answers") or []))


def extract_chartqa(prediction: str, reference: dict) -> str:
    """What is compared: the stripped prediction."""
    return str(prediction).strip()
