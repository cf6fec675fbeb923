"""OCRBench: containment of a gold answer in the prediction, 1.0 / 0.0 per question.

Follows VK ``vlmeval/dataset/image_vqa.py::OCRBench.evaluate``; LE
``lmms_eval/tasks/ocrbench/utils.py::ocrbench_process_results`` is the same rule except where noted.

* Handwritten mathematical expressions: gold and prediction stripped, newlines -> spaces, then *all*
  spaces removed; case kept; correct iff gold in prediction.
* Everything else: both lower-cased, stripped, newlines -> spaces; correct iff gold in prediction.
* Several golds: any one contained is enough. (An empty gold is contained in anything, as in both.)

The benchmark score is ``correct / total`` (the sum out of 1000 when ``n`` = 1000, reported /10 by VK
as "Final Score Norm").

LE vs VK:

* which rows get the HME rule: VK keys it on the category (our ``question_type``) being
  "Handwritten Mathematical Expression Recognition", LE on ``dataset == "HME100k"``. In OCRBench the
  two sets coincide; we apply the HME rule when either holds.
* LE folds full-width ASCII (U+FF01-FF5E) and the ideographic space (U+3000) to ASCII in the non-HME
  branch (``_fold_fullwidth_ascii``); VK does not, so ``"ＡＢＣ"`` contains gold ``"abc"`` in LE only.
  **We follow VK** (no folding).
"""

from __future__ import annotations

from collections.abc import Sequence

HME_CATEGORY = "Handwritten Mathematical Expression Recognition"
HME_DATASET = "HME100k"


def _hme_form(text: str) -> str:
    return text.strip().replace("\n", " ").replace(" ", "")


def _plain_form(text: str) -> str:
    return text.lower().strip().replace("\n", " ")


def ocrbench_hit(prediction: str, answers: Sequence[str], hme: bool) -> float:
    """1.0 when a gold answer is contained in the prediction under the row's rule, else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    form = _hme_form if hme else _plain_form
    pred = form(prediction)
    return 1.0 if any(form(str(a)) in pred for a in answers) else 0.0


def is_hme(reference: dict) -> bool:
    return reference.get("question_type") == HME_CATEGORY or reference.get("dataset") == HME_DATASET


def score_ocrbench(prediction: str, reference: dict) -> float:
    """OCRBench: ``ocrbench_hit`` with the HME rule chosen from ``question_type`` / ``dataset``."""
    return ocrbench_hit(prediction, list(reference.get("answers") or []), is_hme(reference))


def extract_ocrbench(prediction: str, reference: dict) -> str:
    """What the golds are looked for in: the prediction in the row's normal form."""
    return _hme_form(prediction) if is_hme(reference) else _plain_form(prediction)
