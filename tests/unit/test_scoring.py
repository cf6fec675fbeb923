"""Scoring rules (smolvlm.evaluation.scoring) against hand-computed cases.

Where lmms-eval (LE) and VLMEvalKit (VK) disagree, the test names the case, says what LE gives and
asserts the side we follow (tests/unit/test_scoring_oracle.py checks the LE values against LE itself).
"""

from __future__ import annotations

import pytest

from smolvlm.evaluation.scoring import EXTRACTORS, METRIC_NAMES, SCORERS, extract, extract_choice
from smolvlm.evaluation.scoring.anls import anls
from smolvlm.evaluation.scoring.mmmu import parse_multi_choice, parse_open_response
from smolvlm.evaluation.scoring.ocrbench import ocrbench_hit
from smolvlm.evaluation.scoring.relaxed import relaxed_correctness
from smolvlm.evaluation.scoring.video import videomme_letter
from smolvlm.evaluation.scoring.vqa import evalai_normalize, vk_normalize, vqa_accuracy

BENCHMARKS = {"docvqa", "textvqa", "chartqa", "ocrbench", "ai2d", "scienceqa", "mmstar", "videomme",
              "mvbench", "mlvu", "mmmu", "mathvista"}
OPTS = {"A": "dog", "B": "cat", "C": "bird", "D": "fish"}


def mcq(answer="B", options=OPTS):
    return {"answer": answer, "options": dict(options)}


# -- contract -------------------------------------------------------------------------------------
def test_contract_names():
    assert set(SCORERS) == BENCHMARKS == set(METRIC_NAMES) == set(EXTRACTORS)
    assert METRIC_NAMES["docvqa"] == "anls" and METRIC_NAMES["textvqa"] == "vqa_accuracy"
    assert METRIC_NAMES["chartqa"] == "relaxed_accuracy" and METRIC_NAMES["mmmu"] == "accuracy"


REFS = {
    "docvqa": {"answers": ["x"]}, "textvqa": {"answers": ["x"] * 10}, "chartqa": {"answers": ["x"]},
    "ocrbench": {"answers": ["x"], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"},
    "ai2d": mcq(), "scienceqa": mcq(), "mmstar": mcq(), "videomme": mcq(), "mvbench": mcq(), "mlvu": mcq(),
    "mmmu": {"question_type": "multiple-choice", "answer": "B", "options": OPTS},
    "mathvista": {"question_type": "free_form", "answer_type": "integer", "answer": "3", "choices": None,
                  "precision": None, "unit": None},
}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
@pytest.mark.parametrize("pred", ["", "   ", None, "x", "B", "3", "no idea at all"])
def test_every_scorer_returns_a_float_in_range(name, pred):
    s = SCORERS[name](pred, REFS[name])
    assert isinstance(s, float) and 0.0 <= s <= 1.0
    e = extract(name, pred, REFS[name])
    assert e is None or isinstance(e, str)


@pytest.mark.parametrize("name", ["ai2d", "scienceqa", "mmstar", "videomme", "mvbench", "mlvu", "mmmu", "mathvista"])
def test_empty_prediction_scores_zero_and_extracts_nothing(name):
    assert SCORERS[name]("", REFS[name]) == 0.0
    assert extract(name, "", REFS[name]) is None


# -- ANLS ------------------------------------------------------------------------------------------
def test_anls_case_and_whitespace():
    assert anls("  Hello   World ", ["hello world"]) == pytest.approx(1 - 0 / 16)


def test_anls_threshold_boundary():
    assert anls("abxy", ["abcd"]) == 0.5  # distance 2/4 = 0.5 -> kept (the test is "< 0.5")
    assert anls("abcxxxx", ["abcdefg"]) == 0.0  # 1 - 4/7 = 0.43 < 0.5
    assert anls("abcdxxx", ["abcdefg"]) == pytest.approx(1 - 3 / 7)  # 0.57, just above


def test_anls_best_of_several_golds_and_raw_length_quirk():
    assert anls("abce", ["zzzz", "abcd"]) == pytest.approx(0.75)
    # denominator = raw length (both references): "a  b" is 4 long though it compares as "a b"
    assert anls("a c", ["a  b"]) == pytest.approx(1 - 1 / 4)


def test_anls_empty():
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", []) == 0.0
    assert anls("", [""]) == 1.0


def test_docvqa_scorer_strips_like_vk_wrapper():
    # raw: max(len("  abc "), 3) = 6 -> 1 - 1/6; the scorer sees "abc" (VK's wrapper strips) -> 1 - 1/3
    assert anls("  abc ", ["abd"]) == pytest.approx(1 - 1 / 6)
    assert SCORERS["docvqa"]("  abc ", {"answers": ["abd"]}) == pytest.approx(1 - 1 / 3)
    assert extract("docvqa", " Foo  BAR ", {"answers": []}) == "foo bar"


# -- VQA accuracy ---------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", [vk_normalize, evalai_normalize])
@pytest.mark.parametrize("raw,expected", [
    ("Two", "2"), ("ten dogs", "10 dogs"), ("none", "0"),  # number words
    ("a dog", "dog"), ("The Cat", "cat"), ("an apple", "apple"),  # articles
    ("dont", "don't"), ("isnt it", "isn't it"), ("Im", "im"),  # contractions ("Im" key can't match)
    ("black/white", "black white"), ("yes.", "yes"), ("(hello)", "hello"), ("coca - cola", "coca cola"),
    ("3.5", "3.5"), ("hello!", "hello"), ("new\nyork", "new york"),
])
def test_vqa_normalisation_shared(norm, raw, expected):
    assert norm(raw) == expected


def test_vqa_accuracy_partial_credit():
    answers = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("red", answers) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((3 * (2 / 3) + 7) / 10)  # 0.9
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("Two", ["2"] * 10) == 1.0
    assert vqa_accuracy("", ["yes"] * 10) == 0.0
    assert vqa_accuracy("yes", []) == 0.0


def test_vqa_le_vs_vk_period_after_digit():
    # VK's period rule (?<!\d)\.(?!\d) keeps "5."; LE's official-typo rule strips it. We follow VK.
    assert vk_normalize("5.") == "5." and evalai_normalize("5.") == "5"
    assert SCORERS["textvqa"]("5.", {"answers": ["5"] * 10}) == 0.0
    assert vqa_accuracy("5.", ["5"] * 10, normalize=evalai_normalize) == 1.0


def test_vqa_le_vs_vk_commas_question_marks_possessive():
    assert (vk_normalize("x,y"), evalai_normalize("x,y")) == ("x y", "xy")
    assert (vk_normalize("x?y"), evalai_normalize("x?y")) == ("x y", "xy")
    assert (vk_normalize("1,000/2"), evalai_normalize("1,000/2")) == ("10002", "1000 2")
    assert (vk_normalize("John's"), evalai_normalize("John's")) == ("john's", "john 's")
    assert vk_normalize("1,000") == evalai_normalize("1,000") == "1000"
    assert SCORERS["textvqa"]("x,y", {"answers": ["x y"] * 10}) == 1.0  # LE: 0.0


# -- ChartQA relaxed accuracy ----------------------------------------------------------------------
def test_relaxed_percent_both_sides():
    assert relaxed_correctness("45%", "0.45") and relaxed_correctness("0.45", "45%")
    assert not relaxed_correctness("45%", "45") and not relaxed_correctness("45", "45%")
    assert relaxed_correctness("45%", "45%")


def test_relaxed_five_percent_boundary():
    assert relaxed_correctness("105", "100") and relaxed_correctness("95", "100")
    assert not relaxed_correctness("105.01", "100") and not relaxed_correctness("94.9", "100")
    assert relaxed_correctness("21", "20")  # 1/20 = 0.05 exactly


def test_relaxed_zero_gold_and_text():
    assert not relaxed_correctness("0.0", "0") and relaxed_correctness("0", "0")  # gold 0 -> string test
    assert relaxed_correctness("Yes", "yes") and not relaxed_correctness("yes!", "yes")
    assert not relaxed_correctness("", "5")


def test_chartqa_max_over_golds_and_strip_le_vs_vk():
    assert SCORERS["chartqa"]("10", {"answers": ["30", "10.4"]}) == 1.0
    assert SCORERS["chartqa"]("10", {"answers": []}) == 0.0
    # VK strips the prediction; LE compares " yes" raw -> wrong in LE, right here
    assert relaxed_correctness(" yes", "yes")
    assert relaxed_correctness("5% ", "0.05")  # LE: "5% " is no percentage -> wrong


# -- OCRBench ---------------------------------------------------------------------------------------
def ocr(answers, dataset="IIIT5K", qtype="Regular Text Recognition"):
    return {"answers": answers, "dataset": dataset, "question_type": qtype}


def test_ocrbench_containment_case_insensitive():
    assert SCORERS["ocrbench"]("The word is HELLO world", ocr(["hello"])) == 1.0
    assert SCORERS["ocrbench"]("helo", ocr(["hello"])) == 0.0
    assert SCORERS["ocrbench"]("a b", ocr(["zzz", "a\nb"])) == 1.0  # newline -> space, any gold
    assert SCORERS["ocrbench"]("", ocr(["a"])) == 0.0


def test_ocrbench_hme_space_removal_and_case():
    hme = ocr(["x ^ { 2 }"], "HME100k", "Handwritten Mathematical Expression Recognition")
    assert SCORERS["ocrbench"]("x^{2}", hme) == 1.0
    assert SCORERS["ocrbench"]("x^{2}", ocr(["x ^ { 2 }"])) == 0.0
    assert ocrbench_hit("x", ["X"], hme=True) == 0.0 and ocrbench_hit("x", ["X"], hme=False) == 1.0
    # either key selects the HME rule (VK: category, LE: dataset)
    assert SCORERS["ocrbench"]("ab", ocr(["a b"], "HME100k", "")) == 1.0
    assert SCORERS["ocrbench"]("ab", ocr(["a b"], "", "Handwritten Mathematical Expression Recognition")) == 1.0
    assert extract("ocrbench", "x ^ 2", hme) == "x^2"


def test_ocrbench_fullwidth_le_vs_vk():
    # LE folds full-width ASCII before comparing (-> 1); VK does not. We follow VK.
    assert SCORERS["ocrbench"]("ＡＢＣ", ocr(["abc"])) == 0.0


# -- can_infer multiple choice (AI2D, ScienceQA, MMStar) -------------------------------------------------
@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("B. cat", "B"), ("(C)", "C"), ("The answer is D", "D"), ("Answer: [A]", "A"),
    ("cat", "B"),  # option text
    ("A or B", None),  # several letters, no unique option text
    ("dog or cat", None),  # two option texts
    ("B is what the picture seems to show but look at all the other many animals", None),  # letter too early
    ("The correct answer is **B**, and A is wrong", "B"),  # VK's verbose-answer regex
    ("the answer is a cat", "A"),  # same regex: case-insensitive, no word boundary (VK HEAD quirk)
    ("Cannot determine the answer", None), ("Z", None), ("", None), ("I have no idea", None),
])
def test_extract_choice(pred, letter):
    assert extract_choice(pred, OPTS) == letter


def test_extract_choice_accepts_a_list_of_options():
    assert extract_choice("fish", ["dog", "cat", "bird", "fish"]) == "D"


def test_ai2d_le_vs_vk():
    # LE AI2D: "^\s*([A-Z])\." else the whole response, exact match -> "The answer is B" is wrong in LE
    assert SCORERS["ai2d"]("The answer is B", mcq("B")) == 1.0


def test_scienceqa_le_vs_vk():
    # LE ScienceQA: the letter itself or an "X." prefix only -> "(B)" is wrong in LE
    assert SCORERS["scienceqa"]("(B)", mcq("B")) == 1.0


def test_mmstar_le_vs_vk():
    # LE MMStar's ranked extract_mcq_answer takes the leading "A" of "A or B" (-> 1 for gold A)
    assert SCORERS["mmstar"]("A or B", mcq("A")) == 0.0
    assert extract("mmstar", "A or B", mcq("A")) is None


# -- Video-MME -------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("The answer is C.", "C"), ("Answer: D", "D"), ("(A) a dog", "A"),
    ("Based on the video, the answer is C", "B"),  # first capital A-D anywhere (LE: C)
    ("Best answer: C", "B"),  # VK's missing comma: "Best answer:" is never stripped (LE: C)
    ("The best option is C", "C"), ("The correct option is D", "D"),  # no A-D capital in those prefixes
])
def test_videomme_letter(pred, letter):
    assert videomme_letter(pred) == letter
    assert extract("videomme", pred, mcq(letter)) == letter


def test_videomme_text_fallback_and_nothing():
    opts = {"A": "running dog", "B": "sleeping cat", "C": "flying bird", "D": "swimming fish"}
    assert videomme_letter("it is a sleeping cat") == ""
    assert SCORERS["videomme"]("it is a sleeping cat", mcq("B", opts)) == 1.0
    assert extract("videomme", "no idea", mcq("B", opts)) is None
    assert SCORERS["videomme"]("", mcq("B", opts)) == 0.0


# -- MVBench ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,score", [
    ("(B) cat", 1.0), ("B", 1.0), ("b.", 1.0), ("B) cat", 1.0), ("(b).", 1.0), ("(B", 1.0),
    ("A", 0.0), ("(C) bird", 0.0),
    ("I think it is B", 1.0),  # first token fails, can_infer finds B
    ("a dog I think, no, a cat", 0.0),
])
def test_mvbench(pred, score):
    assert SCORERS["mvbench"](pred, mcq("B")) == score


def test_mvbench_article_quirk_and_extract():
    # VK: first token "a" is a substring of "(a)" -> an answer starting with the article "a" is "A"
    assert SCORERS["mvbench"]("a dog is running", mcq("A")) == 1.0
    assert extract("mvbench", "A", mcq("B")) == "A"
    assert extract("mvbench", "hmm", mcq("B")) is None


@pytest.mark.parametrize("pred", ["", "(", ")", "...", ". B"])
def test_mvbench_letterless_first_token_deviation(pred):
    # VK credits these (the token is a substring of "(b)"); we require the gold letter in the token
    # and fall back to can_infer (". B" -> B via can_infer, so it still scores)
    expected = 1.0 if pred == ". B" else 0.0
    assert SCORERS["mvbench"](pred, mcq("B")) == expected


# -- MLVU ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,score", [
    ("B", 1.0), ("(B) cat", 1.0), ("B) cat", 1.0), ("The answer is (B).", 1.0),
    ("b", 0.0),  # exact, case-sensitive letter test; can_infer sees no capital letter
    ("cat", 1.0),  # can_infer option text
    (")", 0.0), ("", 0.0), ("(A) dog", 0.0),
])
def test_mlvu(pred, score):
    assert SCORERS["mlvu"](pred, mcq("B")) == score


def test_mlvu_extract():
    assert extract("mlvu", "(A) dog", mcq("B")) == "A"
    assert extract("mlvu", "nothing", mcq("B")) is None


# -- MMMU -------------------------------------------------------------------------------------------
MMMU_OPTS = {"A": "green pear", "B": "red apple", "C": "yellow banana", "D": "blue berry"}


def mmmu_mc(answer="B"):
    return {"question_type": "multiple-choice", "answer": answer, "options": dict(MMMU_OPTS)}


@pytest.mark.parametrize("pred,letter", [
    ("(B)", "B"), ("B", "B"), ("B.", "B"), ("The answer is B.", "B"),
    ("(A) is wrong, so (C) is right", "C"),  # several brackets: the last wins
    ("A or B", "B"),  # several "X " hits: the last " X " wins
    ("I pick A.x or B.y", "A"),  # "X." hits have no " X ": all -1, tie -> first option
    ("I believe the right choice is the red apple here", "B"),  # > 5 words: option text
    ("red apple", None),  # <= 5 words: no text match -> nothing (LE: random option)
    ("I do not know this", None), ("", None),
])
def test_mmmu_multi_choice_parse(pred, letter):
    assert parse_multi_choice(pred, MMMU_OPTS) == letter
    assert SCORERS["mmmu"](pred, mmmu_mc("B")) == (1.0 if letter == "B" else 0.0)


def mmmu_open(answer):
    return {"question_type": "open", "answer": answer, "options": {}}


@pytest.mark.parametrize("pred,answer,score", [
    ("The speed is 3.50 m/s", "3.5", 1.0),
    ("1000", "1,000", 1.0),
    ("x = 2", "2", 1.0),
    ("there are 12 apples", "2", 0.0),  # numeric gold: no substring match
    ("so the result is 0.33", "0.333", 1.0),  # both rounded to 2 places
    ("The capital is Paris.", "paris", 1.0),
    ("the answer is a", "a", 1.0),  # one-character gold needs a space beside it
    ("banana", "a", 0.0),
    ("It is 3.429", "['24/7', '3.429']", 1.0),  # stringified list: any element (LE: the literal string)
    ("", "5", 0.0),
])
def test_mmmu_open(pred, answer, score):
    assert SCORERS["mmmu"](pred, mmmu_open(answer)) == score


def test_mmmu_open_parse():
    assert set(parse_open_response("The speed is 3.50 m/s")) == {"3.50 m/s", 3.5}
    assert extract("mmmu", "x = 2 m", mmmu_open("2")) == "[2.0, '2 m']"


# -- MathVista --------------------------------------------------------------------------------------
CHOICES = ["3/11", "8/11", "6/11", "3/5"]


def mv_mc(answer="8/11"):
    return {"question_type": "multi_choice", "answer_type": "text", "answer": answer, "choices": CHOICES,
            "precision": None, "unit": None}


def mv_free(answer, answer_type, precision=None):
    return {"question_type": "free_form", "answer_type": answer_type, "answer": answer, "choices": None,
            "precision": precision, "unit": None}


@pytest.mark.parametrize("pred,extracted", [
    ("B", "8/11"), ("(B) 8/11", "8/11"), ("8/11", "8/11"), ("The answer is C", "6/11"),
    ("I am not sure", None), ("A or B", None),
])
def test_mathvista_multi_choice(pred, extracted):
    assert extract("mathvista", pred, mv_mc()) == extracted
    assert SCORERS["mathvista"](pred, mv_mc()) == (1.0 if extracted == "8/11" else 0.0)


@pytest.mark.parametrize("pred,ref,extracted,score", [
    ("The total is $1.449", mv_free("1.45", "float", 2), "1.45", 1.0),  # rounded to the precision
    ("1.4", mv_free("1.45", "float", 2), "1.4", 0.0),
    ("0.64", mv_free("0.6", "float", 1.0), "0.6", 1.0),  # precision stored as a float
    ("0.66", mv_free("0.6", "float", 1), "0.7", 0.0),
    ("There are 14 apples.", mv_free("14", "integer"), "14", 1.0),
    ("7.9", mv_free("7", "integer"), "7", 1.0),  # MathVista's int(float(x)) truncates
    ("about 1,234 people", mv_free("1234", "integer"), "1234", 1.0),
    ("from 3 to -5", mv_free("-5", "integer"), "-5", 1.0),
    ("between [2007,2008] it peaks", mv_free("[2007, 2008]", "list"), "[2007, 2008]", 1.0),
    ("no numbers here", mv_free("3", "integer"), None, 0.0),
    ("1.5", mv_free("1.5", "float"), "1.5", 1.0),  # no precision: no rounding
    ('The answer is "blue".', mv_free("blue", "text"), "blue", 1.0),  # LE's quick_extract pattern
])
def test_mathvista_free_form(pred, ref, extracted, score):
    assert extract("mathvista", pred, ref) == extracted
    assert SCORERS["mathvista"](pred, ref) == score
