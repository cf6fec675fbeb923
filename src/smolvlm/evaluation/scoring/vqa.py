"""VQA accuracy (TextVQA): answer normalisation + the 10-annotator leave-one-out average.

Accuracy (VK ``vlmeval/dataset/utils/vqa_eval.py::process_line(method='vqa_score')`` +
``hit_calculate``; LE ``lmms_eval/tasks/textvqa/utils.py::textvqa_process_results``, the same):
for each gold answer i, ``min(1, #(other golds equal to the prediction) / 3)``; the mean over i.

Normalisation: both references use the official VQA steps (punctuation, number words -> digits,
articles dropped, the VQA contraction table), but not identically:

* VK ``process_answer`` (``vqa_eval.py`` + ``vlmeval/smp/misc.py::process_punctuation``):
  newlines/tabs -> spaces, strip, punctuation, digits/articles/contractions. Its period rule is
  ``(?<!\\d)\\.(?!\\d)``: a period right after a digit stays (``"5."`` stays ``"5."``).
* LE ``EvalAIAnswerProcessor`` (``tasks/_task_utils/vqa_eval_metric.py``, from MMF/EvalAI) first runs
  ``word_tokenize``: lower-case, delete every ``,`` and ``?``, ``"'s"`` -> ``" 's"``. Its period rule is
  the official script's typo ``(?!<=\\d)(\\.)(?!\\d)`` (a look-*ahead*), so ``"5."`` -> ``"5"``. Because
  commas are already gone, its "digit,digit -> delete all punctuation" switch never fires.

So LE and VK disagree on: a period after a digit (``"5."``), ``"a,b"`` (LE ``"ab"``, VK ``"a b"``),
``"a?b"`` (LE ``"ab"``, VK ``"a b"``), ``"1,000/2"`` (LE ``"1000 2"``, VK ``"10002"``), ``"x's"``
(LE ``"x 's"``, VK ``"x's"``). **We follow VK** (``vk_normalize``, used by ``score_textvqa``);
``evalai_normalize`` is LE's processor, kept and checked against LE in the oracle tests.

Shared quirk kept: both pass ``re.UNICODE`` as the *count* argument of ``Pattern.sub``, so at most 32
periods are removed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

# The official VQA table (identical in LE and VK), "key=value" pairs. Keys with capitals ("Im", "Ive",
# "Id've", "I'dve") can never match (text is lower-cased first); "somebody'd" -> "somebodyd" is the
# official table's reversed entry. Both kept as in the references.
_CONTRACTION_PAIRS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's
howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd
itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't
mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at
'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've
shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd
somebodyd've=somebody'd've somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's
someoned=someone'd someoned've=someone'd've someone'dve=someone'd've someonell=someone'll
someones=someone's somethingd=something'd somethingd've=something'd've something'dve=something'd've
somethingll=something'll thats=that's thered=there'd thered've=there'd've there'dve=there'd've
therere=there're theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll
theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've
werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's whered=where'd
wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
"""
CONTRACTIONS: dict[str, str] = dict(pair.split("=", 1) for pair in _CONTRACTION_PAIRS.split())
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
               ",", "?", "!")

_VK_COMMA = re.compile(r"\d,\d")
_VK_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_LE_COMMA = re.compile(r"(?<=\d),+(?=\d)")
_LE_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official typo, effectively \.(?!\d)
_PERIOD_SUB_COUNT = int(re.UNICODE)  # sic: both references pass re.UNICODE (32) as `count`


def _punctuation(text: str, comma: re.Pattern, period: re.Pattern) -> str:
    """The VQA punctuation rule: a mark touching a space (or any mark when the text has a
    digit,digit comma) is deleted, otherwise replaced by a space; then periods not before a digit go."""
    out = text
    strip_all = comma.search(text) is not None
    for p in PUNCTUATION:
        out = out.replace(p, "" if strip_all or (p + " " in text or " " + p in text) else " ")
    return period.sub("", out, count=_PERIOD_SUB_COUNT)


def _digits_articles(text: str) -> str:
    """Lower-case, number words 0-10 -> digits, drop a/an/the, apostrophe-less contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vk_normalize(answer: str) -> str:
    """VK ``vqa_eval.py::process_answer`` (what TextVQA is scored with here)."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer, _VK_COMMA, _VK_PERIOD))


def evalai_normalize(answer: str) -> str:
    """LE ``EvalAIAnswerProcessor.__call__`` (MMF's EvalAI processor), for comparison with LE."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer, _LE_COMMA, _LE_PERIOD))


def vqa_accuracy(prediction: str, answers: Sequence[str],
                 normalize: Callable[[str], str] = vk_normalize) -> float:
    """Mean over the golds of ``min(1, matches among the other golds / 3)``; 0.0 without golds."""
    if isinstance(answers, str):
        answers = [answers]
    golds = [normalize(str(a)) for a in answers]
    if not golds:
        return 0.0
    pred = normalize(prediction)
    total = 0.0
    for i in range(len(golds)):
        matches = sum(1 for j, g in enumerate(golds) if j != i and g == pred)
        total += min(1.0, matches / 3)
    return total / len(golds)


def score_textvqa(prediction: str, reference: dict) -> float:
    """TextVQA: ``vqa_accuracy`` with VK's normalisation (see the module docstring for LE's)."""
    return vqa_accuracy(prediction, list(reference.get("answers") or []))


def extract_textvqa(prediction: str, reference: dict) -> str:
    """What is compared: the VK-normalised prediction."""
    return vk_normalize(prediction)
