"""MMMU: MMMU's own answer parsing (as LE runs it), with a deterministic "no answer" case.

Multiple choice follows LE ``lmms_eval/tasks/_task_utils/mmmu_mcq_utils.py::
parse_mmmu_multi_choice_response`` (= MMMU's ``eval/eval_utils.py::parse_multi_choice_response``):
strip ``,.!?;:'`` from the ends, pad with spaces, then the first rule that finds candidates:
"(A)" > "A " > "A." > (responses over 5 words) an option's text; several candidates -> the one whose
last occurrence is latest ("(X)" for bracket hits, " X " for letter hits -- which is -1 for "X." hits,
so ties go to the earliest option letter -- the option text for text hits). **No candidate: LE picks a
random option (``random.choice``); we return None and score 0.**

Open questions follow LE ``lmms_eval/tasks/mmmu/utils.py::parse_open_response`` / ``extract_numbers``
/ ``normalize_str`` / ``eval_open``: the key sub-responses (text after "is ", "so ", "answer ", ...,
"=" in the last line), plus every number in them; numbers become floats rounded to 2 places, strings
are lower-cased; correct if a predicted float equals a gold float, or a gold string is a substring of
a predicted string (one-character golds need a space on one side).

Gold answers of open questions may be a stringified Python list ("['24/7', '3.429']", as the MMMU
dataset stores several acceptable answers); we parse it and accept any element, as MMMU's own
evaluation does (its answer_dict has real lists). LE passes the string unparsed, so such a gold only
matches a prediction containing the literal "['24/7', '3.429']" -- LE and we differ there.

VK (``vlmeval/dataset/image_mcq.py::MMMUDataset`` -> ``ImageMCQDataset.evaluate``) scores MMMU
differently: multiple choice by ``can_infer`` then an LLM judge; open questions are rewritten as a
two-option question (A = the gold answer text, B = "Other Answers", ``multiple_choice.py::
MMMU_preproc``) and scored the same way. We follow MMMU's rules above (deterministic, no judge).
"""

from __future__ import annotations

import ast
import re

from smolvlm.evaluation.scoring.choice import normalize_options

_END_MARKS = (",", ".", "!", "?", ";", ":", "'")


def parse_multi_choice(response: str, options) -> str | None:
    """MMMU's multiple-choice parse (see the module docstring); None when no candidate is found."""
    options = normalize_options(options)
    letters = list(options)
    for mark in _END_MARKS:
        response = response.strip(mark)
    response = f" {response} "
    by_text = bracket = False
    cands = [c for c in letters if f"({c})" in response]
    if cands:
        bracket = True
    else:
        cands = [c for c in letters if f"{c} " in response] or [c for c in letters if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        cands = [k for k, v in options.items() if v.lower() in response.lower()]
        by_text = bool(cands)
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if by_text:
        pos = [response.lower().rfind(options[c].lower()) for c in cands]
    elif bracket:
        pos = [response.rfind(f"({c})") for c in cands]
    else:
        pos = [response.rfind(f" {c} ") for c in cands]
    return cands[pos.index(max(pos))]  # first maximum, as np.argmax


_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


def extract_numbers(text: str) -> list[str]:
    """Numbers with thousands commas, then scientific notation, then plain numbers (MMMU's order)."""
    return _NUM_COMMAS.findall(text) + _NUM_SCI.findall(text) + _NUM_SIMPLE.findall(text)


def _is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(text: str) -> list:
    """A number -> [float rounded to 2 places]; else [lower-cased text], a single character padded
    with a space on either side (two entries) to avoid trivial substring matches."""
    text = text.strip()
    if _is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_TRIVIAL = {":", ",", ".", "!", "?", ";", "'"}


def _key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    # sic: the (?=[A-Z]) look-ahead cannot match after lower(), so only newlines split
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for i, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if i == len(parts) - 1 else ())
        shortest = None
        for ind in indicators:
            if ind in part:
                tail = part.split(ind)[-1].strip()
                if not shortest or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in _TRIVIAL:
            keys.append(shortest)
    return keys or [response]


def parse_open_response(response: str) -> list:
    """MMMU's open-answer parse: key sub-responses and their numbers, normalised, de-duplicated."""
    keys = _key_subresponses(response)
    raw = list(keys)
    for k in keys:
        raw.extend(extract_numbers(k))
    out = []
    for r in raw:
        out.extend(normalize_str(r))
    return list(set(out))


def parse_gold(answer) -> str | list[str]:
    """An open question's gold: a stringified list -> its elements as strings; else the string."""
    if isinstance(answer, (list, tuple)):
        return [str(a) for a in answer]
    answer = str(answer)
    if answer.strip().startswith("["):
        try:
            value = ast.literal_eval(answer.strip())
        except (ValueError, SyntaxError):
            return answer
        if isinstance(value, (list, tuple)):
            return [str(a) for a in value]
    return answer


def eval_open(gold, preds: list) -> bool:
    """MMMU's ``eval_open``: float in the gold floats, or a gold string inside a predicted string."""
    golds = []
    for g in gold if isinstance(gold, list) else [gold]:
        golds.extend(normalize_str(g))
    for pred in preds:
        if isinstance(pred, str):
            if any(isinstance(g, str) and g in pred for g in golds):
                return True
        elif pred in golds:
            return True
    return False


def _is_mc(reference: dict) -> bool:
    return reference.get("question_type", "multiple-choice") == "multiple-choice"


def score_mmmu(prediction: str, reference: dict) -> float:
    """MMMU: multiple choice -> parsed letter == gold letter (None -> 0); open -> ``eval_open``."""
    if _is_mc(reference):
        letter = parse_multi_choice(prediction, reference.get("options"))
        return 1.0 if letter is not None and letter == str(reference.get("answer", "")).strip() else 0.0
    return 1.0 if eval_open(parse_gold(reference.get("answer", "")), parse_open_response(prediction)) else 0.0


def extract_mmmu(prediction: str, reference: dict) -> str | None:
    """The parsed letter (None if none), or for open questions the sorted candidate list as text."""
    if _is_mc(reference):
        return parse_multi_choice(prediction, reference.get("options"))
    preds = parse_open_response(prediction)
    return str(sorted(preds, key=lambda p: (isinstance(p, str), str(p))))
