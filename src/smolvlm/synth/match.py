"""Answer comparison for the synthetic set: ``answers_match`` (bool), the one normalised comparison
that ``evaluation.metrics.exact_match`` turns into a score.

``normalize_answer`` follows the spirit of the VQA answer normalisation (lower case, no
punctuation, no articles, number words -> digits) plus what our answers need: decimal points
inside numbers survive ("12.50"), numbers are canonical ("12.50" == "12.5", "1,200" == "1200",
"007" == "7"), currency signs are dropped.
"""

from __future__ import annotations

import re

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_WORD_NUM = {w: i for i, w in enumerate(_UNITS)} | _TENS
_ARTICLES = {"a", "an", "the"}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PUNCT = re.compile(r"(?!(?<=\d)\.(?=\d))[^\w\s]|_")  # any punctuation except a decimal point


def _canon_number(tok: str) -> str:
    if re.fullmatch(r"\d+", tok):
        return str(int(tok))
    if re.fullmatch(r"\d+\.\d+", tok):
        whole, frac = tok.split(".")
        frac = frac.rstrip("0")
        return str(int(whole)) + ("." + frac if frac else "")
    return tok


def _words_to_numbers(tokens: list[str]) -> list[str]:
    """"twenty one" -> "21", "seven" -> "7"; anything else unchanged."""
    out: list[str] = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t in _TENS and i + 1 < len(tokens) and tokens[i + 1] in _WORD_NUM and _WORD_NUM[tokens[i + 1]] < 10:
            out.append(str(_TENS[t] + _WORD_NUM[tokens[i + 1]]))
            i += 2
            continue
        out.append(str(_WORD_NUM[t]) if t in _WORD_NUM else t)
        i += 1
    return out


def normalize_answer(s: str) -> str:
    """Canonical form of a short answer (see module docstring)."""
    s = _THOUSANDS.sub("", s.strip().lower())
    s = _PUNCT.sub(" ", s)
    tokens = _words_to_numbers(s.split())
    kept = [t for t in tokens if t not in _ARTICLES]
    tokens = kept or tokens  # "a" alone stays "a": never normalise an answer to nothing
    return " ".join(_canon_number(t) for t in tokens)


def answers_match(pred: str, gold: str) -> bool:
    """True when ``pred`` and ``gold`` are the same answer after ``normalize_answer``."""
    return normalize_answer(pred) == normalize_answer(gold)
