"""MathVista (testmini): rule-based answer extraction, then MathVista's normalisation and equality.

Both references extract the answer with a GPT judge (LE ``lmms_eval/tasks/mathvista/mathvista_evals.py
::MathVistaEvaluator.extract_answer`` with ``quick_extract: false``; VK ``vlmeval/dataset/utils/
mathvista.py::MathVista_auxeval``), so neither can be followed offline. **Ours is rule-based** (report
the results as such):

* multi_choice: the response equals an option text -> that text (LE's first shortcut); else VK's
  prefetch, ``can_infer(response, {A: choice, ...})`` (``scoring/choice.py``) -> the chosen option's
  text; else nothing (score 0; LE would take the Levenshtein-nearest option after the judge).
* free_form integer / float: the whole response if it parses (``int`` / ``float``, the shortcut both
  references take before the judge), else the last number in the response (thousands commas dropped).
* free_form list: the last ``[...]`` in the response, re-printed by Python when it parses.
* free_form text: the text inside ``The answer is "..."`` (LE's ``quick_extract``), else the response.
* ``unit`` is not used (a number is taken whatever unit follows it).

Then MathVista's ``normalize_extracted_answer`` (as in LE): integer -> ``str(int(float(x)))`` (it
truncates: "7.9" -> "7"); float -> ``str(round(float(x), precision))``; list/text -> ``str(x)``;
and ``safe_equal``: ``str(pred).strip() == str(answer).strip()``.

VK's own comparison (``post_check``) differs: exact ``int`` / ``float`` equality without rounding to
the precision, and for text/list answer types it compares ``str(None)`` (a bug) so those are never
correct. We follow MathVista's normalisation (as LE) instead.
"""

from __future__ import annotations

import ast
import math
import re
import string

from smolvlm.evaluation.scoring.choice import can_infer

_NUMBER = re.compile(r"(?<![\d.])-?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_LIST = re.compile(r"\[[^\[\]]*\]")
_QUICK = re.compile(r'The answer is "(.*)"\.')


def last_number(text: str) -> str | None:
    """The last number in ``text`` (a leading minus counts unless glued to a digit), commas dropped."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _precision(value) -> int | None:
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else int(value)


def extract_raw(prediction: str, reference: dict) -> str | None:
    """The answer text picked out of the response, before MathVista's normalisation (None: nothing)."""
    response = prediction.strip()
    if not response:
        return None
    question_type, answer_type = reference.get("question_type"), reference.get("answer_type")
    if question_type == "multi_choice":
        choices = [str(c) for c in (reference.get("choices") or [])]
        if response in choices:
            return response
        letter = can_infer(response, {string.ascii_uppercase[i]: c for i, c in enumerate(choices)})
        if letter and letter in string.ascii_uppercase[:len(choices)]:
            return choices[string.ascii_uppercase.index(letter)]
        return None
    if answer_type in ("integer", "float"):
        try:
            return str(int(response) if answer_type == "integer" else float(response))
        except ValueError:
            return last_number(response)
    if answer_type == "list":
        found = _LIST.findall(response)
        if not found:
            return None
        try:
            return str(list(ast.literal_eval(found[-1])))
        except (ValueError, SyntaxError, TypeError):
            return found[-1]
    m = _QUICK.search(response)
    return m.group(1) if m else response


def normalize_extracted(extraction: str | None, reference: dict) -> str | None:
    """MathVista's ``normalize_extracted_answer`` for the free-form types (a multi-choice extraction is
    already an option text). Float with no precision: ``str(float(x))`` (``round(x, None)`` would give an
    int)."""
    if extraction is None:
        return None
    answer_type = reference.get("answer_type")
    if reference.get("question_type") == "multi_choice":
        return extraction
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            precision = _precision(reference.get("precision"))
            value = float(extraction)
            return str(value if precision is None else round(value, precision))
    except (ValueError, OverflowError):
        return None
    return str(extraction)


def safe_equal(prediction, answer) -> bool:
    """MathVista's ``safe_equal``: the two as stripped strings are equal."""
    return str(prediction).strip() == str(answer).strip()


def extract_mathvista(prediction: str, reference: dict) -> str | None:
    """The normalised extracted answer (what is compared with ``reference["answer"]``)."""
    return normalize_extracted(extract_raw(prediction, reference), reference)


def score_mathvista(prediction: str, reference: dict) -> float:
    """1.0 iff the normalised extraction ``safe_equal``s the gold answer; nothing extracted -> 0."""
    pred = extract_mathvista(prediction, reference)
    return 1.0 if pred is not None and safe_equal(pred, reference.get("answer", "")) else 0.0
