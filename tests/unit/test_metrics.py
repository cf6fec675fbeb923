"""evaluation/metrics.py against hand-computed values (ANLS, VQA accuracy, aggregation)."""

from __future__ import annotations

import pytest

from smolvlm import synth
from smolvlm.evaluation.metrics import (aggregate, anls, exact_match, levenshtein, normalize_vqa_answer,
                                        vqa_accuracy)


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
    assert anls("ab", "ax") == 0.0  # NL = 0.5 is not < 0.5: the threshold zeroes it
    assert anls("abc", "xyz") == 0.0
    assert anls("", "") == 1.0
    assert anls("", "abc") == 0.0
    # several golds: the best counts ("flaw"/"lawn" is NL 0.5 -> 0, "flaws" is 1/5 -> 0.8)
    assert anls("flaw", ["lawn", "flaws"]) == pytest.approx(0.8)
    assert anls("abcd", "abce", threshold=0.2) == 0.0  # NL 0.25 >= 0.2
    with pytest.raises(ValueError, match="gold"):
        anls("x", [])


def test_vqa_accuracy_hand_computed():
    # 10 human answers, m of them match: leaving out a match (m subsets) leaves m-1, otherwise m;
    # accuracy = (m * min((m-1)/3, 1) + (10-m) * min(m/3, 1)) / 10
    others = ["dog"] * 10
    expected = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9, 4: 1.0, 10: 1.0}
    for m, acc in expected.items():
        answers = ["cat"] * m + others[m:]
        assert vqa_accuracy("cat", answers) == pytest.approx(acc), m
    # normalisation: number words, articles, punctuation, case
    assert vqa_accuracy("Two.", ["2", "2", "2"] + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_accuracy("the dog", ["dog"] * 10) == 1.0
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("x", ["x"])


def test_vqa_normalisation_rules():
    assert normalize_vqa_answer("Black/White") == "black white"  # mark not touching a space -> space
    assert normalize_vqa_answer("yes !") == "yes"  # mark touching a space -> removed
    assert normalize_vqa_answer("1,000") == "1000"  # 1,000-style comma -> removed
    assert normalize_vqa_answer("3.5") == "3.5"  # decimal point kept
    assert normalize_vqa_answer("A dog.") == "dog"
    assert normalize_vqa_answer("none") == "0"
    assert normalize_vqa_answer("dont\tknow") == "don't know"


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
