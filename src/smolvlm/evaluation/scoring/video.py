"""Video multiple choice: Video-MME, MVBench, MLVU (the VK rules, exact-matching judge).

References: VK ``vlmeval/dataset/utils/videomme.py::extract_characters_regex`` (+ ``extract_option``,
called from ``vlmeval/dataset/videomme.py::VideoMME.evaluate``), ``vlmeval/dataset/utils/mvbench.py::
check_ans_with_model`` (``vlmeval/dataset/mvbench.py``) and ``vlmeval/dataset/utils/mlvu.py::
check_ans_with_model`` (``vlmeval/dataset/mlvu.py::MLVU_MCQ``). Each falls back to
``extract_answer_from_item`` = ``can_infer`` (``scoring/choice.py``) and then, in VK, to an LLM judge or
(``exact_matching``) "wrong"; we stop after ``can_infer``: no answer found -> 0, deterministically.

LE differs for all three; we follow VK:
* Video-MME and MLVU (``tasks/videomme/utils.py``, ``tasks/mlvu/utils.py``): LE 0.7.3 calls
  ``_task_utils/mcq_extract.py::extract_mcq_answer`` (a ranked search), no prefix stripping.
* MVBench (``tasks/mvbench/utils.py::mcq_acc``): "X. text" -> X, else VQA punctuation clean-up and the
  first standalone A-E (case-insensitive).
"""

from __future__ import annotations

import re

from smolvlm.evaluation.scoring.choice import can_infer, normalize_options

# VK's list as written: two missing commas concatenate "The best option is" + "The correct option is"
# and "Best answer:" + "Best option:", so none of those four is stripped on its own (kept: this is
# what VK's numbers come from). Since "Best ..." then stays, its "B" is the first capital A-D.
VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option isThe correct option is", "Best answer:Best option:", "Answer:",
                     "Option:")


def videomme_letter(prediction: str) -> str:
    """VK ``extract_characters_regex``: strip, delete each prefix, then the first capital A-D anywhere
    (a word's capital counts: "Based on ..." -> "B"); "" when there is none. (VK's extra "more than 10
    words and no A-D -> ''" test is implied by the search failing.)"""
    s = prediction.strip()
    for prefix in VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    m = re.search(r"[ABCD]", s)
    return m.group(0) if m else ""


def _inferred(prediction: str, options: dict) -> str | None:
    letter = can_infer(prediction, options)
    return letter if letter and letter in options else None


def extract_videomme(prediction: str, reference: dict) -> str | None:
    """Video-MME: ``videomme_letter``; if empty, VK's ``extract_option`` = ``can_infer`` on the option
    texts. None when neither finds a letter."""
    letter = videomme_letter(prediction)
    if letter:
        return letter
    return _inferred(prediction, normalize_options(reference.get("options")))


def extract_mvbench(prediction: str, reference: dict) -> str | None:
    """MVBench, VK ``check_ans_with_model``: gold "(x) text"; first token ``t`` of
    ``prediction.lower().strip().split(' ')``; correct if ``t.replace('.', '')`` is a substring of
    "(x)", or "(x)" is in ``t``; else ``can_infer(prediction)`` == x.

    Returns the gold letter when one of the token rules holds, else the ``can_infer`` letter, else the
    option letter the first token names (``\\(?y\\)?``), else None; so the score is ``extract == gold``.

    Deliberate deviation: VK's substring test also credits tokens without the letter -- an empty
    prediction, "(", ")", "..." (all substrings of "(x)") score 1 in VK; here the token must contain
    the gold letter, so these score 0 (nothing extracted)."""
    options = normalize_options(reference.get("options"))
    gold = str(reference.get("answer", "")).strip()
    token = prediction.lower().strip().split(" ")[0]
    bare = token.replace(".", "")
    if gold:
        gold_opt = f"({gold.lower()})"
        if (gold.lower() in bare and bare in gold_opt) or gold_opt in token:
            return gold
    inferred = _inferred(prediction, options)
    if inferred:
        return inferred
    m = re.fullmatch(r"\(?([a-z])\)?", bare)
    if m and m.group(1).upper() in options:
        return m.group(1).upper()
    return None


def extract_mlvu(prediction: str, reference: dict) -> str | None:
    """MLVU (multiple choice), VK ``check_ans_with_model``: if the prediction has ")", take the
    character before the first ")"; correct if that (or the whole prediction) equals the gold letter
    exactly (case-sensitive); else ``can_infer(prediction)`` == gold.

    Returns the gold letter when the first rule holds, else the ``can_infer`` letter, else the option
    letter of the first rule's text, else None; so the score is ``extract == gold``."""
    options = normalize_options(reference.get("options"))
    gold = str(reference.get("answer", "")).strip()
    pred = prediction
    if ")" in pred:
        i = pred.index(")")
        pred = pred[i - 1:i]  # i == 0 gives "" (VK's slice)
    if gold and pred == gold:
        return gold
    inferred = _inferred(prediction, options)
    if inferred:
        return inferred
    return pred if pred in options else None


def _scorer(extract):
    def score(prediction: str, reference: dict) -> float:
        letter = extract(prediction, reference)
        return 1.0 if letter is not None and letter == str(reference.get("answer", "")).strip() else 0.0

    score.__doc__ = f"1.0 iff ``{extract.__name__}`` equals ``reference['answer']``."
    return score


score_videomme = _scorer(extract_videomme)
score_mvbench = _scorer(extract_mvbench)
score_mlvu = _scorer(extract_mlvu)
