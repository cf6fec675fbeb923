"""Answer metrics (pure functions, no torch): exact match, ANLS, VQA accuracy, aggregation.

* ``exact_match``: the synthetic set's scorer as a float, 1.0 where ``synth.answers_match`` holds
  (one comparison; ``synth/match.py`` has its normalisation).
* ``anls``: Average Normalized Levenshtein Similarity as DocVQA defines it (Biten et al. 2019,
  "Scene Text Visual Question Answering"; the DocVQA/ST-VQA evaluation scripts): per question
  ``max_gold (1 - NL(pred, gold))`` when ``NL < 0.5``, else 0, with
  ``NL = levenshtein / max(len)`` on lower-cased, whitespace-collapsed strings.
* ``vqa_accuracy``: the VQA v2 metric (``vqaEval.py`` of the official VQA API): for each of the
  10 leave-one-out subsets of the human answers, ``min(#matching humans / 3, 1)``, averaged.
  Answers are normalised with the official punctuation and digit/article processing
  (``processPunctuation`` + ``processDigitArticle``). Differences, on purpose: the normalisation
  is always applied (the official script applies it only when the humans disagree, which only
  matters for answers that differ by punctuation alone) and the contraction table is a subset.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from smolvlm.synth.match import answers_match, normalize_answer

__all__ = ["ANLS_THRESHOLD", "METRICS", "aggregate", "anls", "exact_match", "levenshtein", "normalize_answer",
           "normalize_vqa_answer", "vqa_accuracy"]

ANLS_THRESHOLD = 0.5


def exact_match(pred: str, gold: str) -> float:
    """1.0 when ``pred`` and ``gold`` are the same answer after ``normalize_answer``, else 0.0."""
    return 1.0 if answers_match(pred, gold) else 0.0


# -- ANLS ----------------------------------------------------------------------------------------
def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_norm(s: str) -> str:
    # DocVQA's script: " ".join(s.strip().lower().split())
    return " ".join(s.strip().lower().split())


def anls(pred: str, golds: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """ANLS of one prediction against one or more gold answers (the best gold counts)."""
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
        raise ValueError("anls needs at least one gold answer")
    p = _anls_norm(pred)
    best = 0.0
    for gold in golds:
        g = _anls_norm(gold)
        longest = max(len(p), len(g))
        nl = levenshtein(p, g) / longest if longest else 0.0  # two empty strings: identical
        best = max(best, 1.0 - nl if nl < threshold else 0.0)
    return best


# -- VQA accuracy -----------------------------------------------------------------------------------
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern (a period not before a digit)
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Subset of the official table: apostrophe-less spellings -> the canonical contraction.
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
                 "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hes": "he's",
                 "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've", "shes": "she's",
                 "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre": "they're",
                 "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wont": "won't", "wouldnt": "wouldn't",
                 "youre": "you're", "youve": "you've"}


def _process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        # official rule: drop the mark when it touches a space (or the text has a 1,000-style comma),
        # else replace it by a space ("black/white" -> "black white")
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(s: str) -> str:
    """The VQA evaluation's answer normalisation (newlines/tabs, punctuation, number words, articles)."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(pred: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy: mean over the k leave-one-out subsets of ``min(#matches in the subset / 3, 1)``
    (k = 10 in VQA v2, so each subset has 9 answers)."""
    if isinstance(human_answers, str) or len(human_answers) < 2:
        raise ValueError("vqa_accuracy needs a list of at least 2 human answers (VQA v2 has 10 per question)")
    p = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in human_answers]
    matches = sum(g == p for g in gts)
    # leaving out a matching answer leaves matches - 1, leaving out another leaves matches
    accs = [min(1.0, (matches - (g == p)) / 3.0) for g in gts]
    return sum(accs) / len(accs)


METRICS = {"exact_match": exact_match, "anls": anls, "vqa_accuracy": vqa_accuracy}


# -- aggregation ---------------------------------------------------------------------------------------
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
