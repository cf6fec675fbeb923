"""evaluation/metrics.py (the synthetic task's metrics) against hand-computed values; the benchmark
rules, VQA accuracy among them, are tested in test_scoring.py."""

from __future__ import annotations

import pytest

from smolvlm import synth
from smolvlm.evaluation.metrics import aggregate, anls, exact_match, levenshtein


def test_exact_match_is_the_synthetic_scorer():
    # one comparison: the float version of synth.answers_match
    for pred, gold in [("12.5", "12.50"), ("Two", "2"), ("the circle", "circle"), ("red", "blue"), ("1,200", "1200")]:
        assert exact_match(pred, gold) == float(synth.answers_match(pred, gold))
    assert exact_match(" Corner Cafe.", "corner cafe") == 1.0
    assert exact_match("Corner", "corner cafe") == 0.0


@pytest.mark.parametrize("a,b,d", [("kitten", "sitting", 3), ("", "abc", 3), ("abc", "", 3), ("flaw", "lawn", 2),
                                   ("same", "same", 0), ("ab", "ba", 2)])
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d


def test_anls_hand_computed():
    assert anls("Corner Cafe", "corner  cafe ") == 1.0  # lower-cased, whitespace collapsed (DocVQA script)
    # kitten -> sitting: 3 edits / 7 chars = 0.4286 < 0.5 -> 1 - 3/7
    assert anls("kitten", "sitting") == pytest.approx(4 / 7)
    assert anls("abcd", "abce") == pytest.approx(0.75)  # 1 edit / 4
    assert anls("ab", "ax") == 0.5  # score 0.5 is kept: both references zero only a score < 0.5
    assert anls("abc", "xyz") == 0.0
    assert anls("", "") == 1.0
    assert anls("", "abc") == 0.0
    # several golds: the best counts ("flaw"/"lawn" is NL 0.5 -> 0.5, "flaws" is 1/5 -> 0.8)
    assert anls("flaw", ["lawn", "flaws"]) == pytest.approx(0.8)
    assert anls("abcd", "abce", threshold=0.8) == 0.0  # score 0.75 < 0.8
    assert anls("x", []) == 0.0  # no gold answer: nothing to match


def test_aggregate():
    out = aggregate([("a", 1.0), ("a", 0.0), ("b", 1.0), ("c", 0.5)])
    assert out["overall"] == pytest.approx(2.5 / 4)  # micro: every record weighs the same
    assert out["macro"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert out["n"] == 4
    assert out["per_category"] == {"a": {"score": 0.5, "n": 2}, "b": {"score": 1.0, "n": 1},
                                   "c": {"score": 0.5, "n": 1}}
    assert list(out["per_category"]) == ["a", "b", "c"]  # first-seen order
    empty = aggregate([])
    assert empty == {"overall": None, "macro": None, "n": 0, "per_category": {}}
