"""Multiple-choice letter extraction: VK's ``can_infer`` (AI2D, ScienceQA, MMStar; the fallback of the
video rules and MathVista's multi-choice extraction).

Follows VK ``vlmeval/utils/matching_util.py::can_infer`` (= ``can_infer_option`` then
``can_infer_text``) as called by ``vlmeval/dataset/utils/multiple_choice.py::extract_answer_from_item``
from ``ImageMCQDataset.evaluate`` (``vlmeval/dataset/image_mcq.py``; vanilla, not circular, for
MMStar / AI2D_TEST / ScienceQA). VK's SmolVLM wrapper gives these sets no special post-processing
(``build_prompt_puremcq`` only rewrites the prompt and ends it with ``"Assistant: Answer:"``).

``can_infer_option`` (VK HEAD):
1. a refusal phrase ("Cannot determine the answer", ...) -> "Z" (no answer);
2. replace ``.()[],:;!*#{}`` by spaces and split on whitespace;
3. exactly one option letter appears as a token and its first occurrence is among the last 4 tokens
   -> that letter (so "B" / "B. text" / "(B)" / "The answer is B" work, a letter early in a long answer
   does not); no option letter but a ``Z`` token -> "Z";
4. else ``(?i)(?:correct\\s+)?answer\\s+is\\s+\\**([ABCD])\\**`` (VK 2026-06, for verbose answers; it is
   case-insensitive and has no word boundary: "the answer is a cat" -> "A").
``can_infer_text``: if the answer is at most twice as long as all option texts together and exactly one
option's text (lower-cased) occurs in it -> that option.

Several letters (e.g. "A or B") and no unique option text -> nothing. When nothing is inferred VK asks
an LLM judge, or with the ``exact_matching`` judge scores the item wrong ("Z"); **we score it 0,
deterministically** (and ``extract_choice`` returns None; "Z" is reported as None too).

VK history (the authors evaluated in early 2025): commit c3371551 (2025-08) added the "last 4 tokens"
condition and the length cap of ``can_infer_text``; a67ace50 (2026-06) added step 4. We follow HEAD.

LE differs per benchmark (we follow VK for all three):
* AI2D (``tasks/ai2d/utils.py::MultiChoiceRegexFilter``): ``^\\s*([A-Z])\\.`` else the whole response,
  then exact match ignoring case and punctuation: "The answer is B" is wrong in LE, right here.
* ScienceQA (``tasks/scienceqa/utils.py::sqa_process_results``): the response equals the letter
  (case-insensitive) or starts with "X."; "(B)" is wrong in LE, right here.
* MMStar (``tasks/mmstar/utils.py`` -> ``tasks/_task_utils/mcq_extract.py::extract_mcq_answer``):
  a ranked search (start > end > answer phrase > "(X)" > "X." > ...), which always finds a letter if
  any A-D occurs: "A or B" -> "A" in LE (starts with A), nothing (0) here.
"""

from __future__ import annotations

import re
import string

_FAILED_API = "Failed to obtain answer via API"
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = ".()[],:;!*#{}"
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
NO_ANSWER = "Z"


def can_infer_option(answer: str, choices: dict) -> str | bool:
    """VK ``can_infer_option`` (non-verbose mode): an option letter, "Z", or False."""
    if _FAILED_API in answer:
        return False
    if any(r in answer for r in _REFUSALS):
        return NO_ANSWER
    mod = answer
    for c in _SEPARATORS:
        mod = mod.replace(c, " ")
    tokens = mod.split()
    present = [c for c in choices if c in tokens]
    if len(present) == 1:
        ch = present[0]
        if tokens.index(ch) > len(tokens) - 5:
            return ch
    elif not present and NO_ANSWER in tokens:
        return NO_ANSWER
    m = _VERBOSE_ANSWER.search(answer or "")
    if m and m.group(1).upper() in choices:
        return m.group(1).upper()
    return False


def can_infer_text(answer: str, choices: dict) -> str | bool:
    """VK ``can_infer_text``: the one option whose text occurs in the (not too long) answer, or False."""
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return False
    found = [k for k, v in choices.items() if str(v).lower() in answer]
    return found[0] if len(found) == 1 else False


def can_infer(answer, choices: dict) -> str | bool:
    """VK ``can_infer``: ``can_infer_option`` else ``can_infer_text``."""
    answer = str(answer)
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def normalize_options(options) -> dict[str, str]:
    """Options as ``{"A": text, ...}``; a list becomes A, B, C, ... in order. Keys must be capitals."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        options = {string.ascii_uppercase[i]: v for i, v in enumerate(options)}
    return {str(k): "" if v is None else str(v) for k, v in options.items()}


def extract_choice(prediction: str, options) -> str | None:
    """The option letter VK's ``can_infer`` finds in ``prediction``; None when it finds none (or "Z")."""
    opts = normalize_options(options)
    letter = can_infer(prediction, opts)
    return letter if letter and letter != NO_ANSWER and letter in opts else None


def score_choice(prediction: str, reference: dict) -> float:
    """AI2D / ScienceQA / MMStar: 1.0 iff ``extract_choice`` equals ``reference["answer"]``."""
    letter = extract_choice(prediction, reference.get("options"))
    return 1.0 if letter is not None and letter == str(reference.get("answer", "")).strip() else 0.0


def extract_mcq(prediction: str, reference: dict) -> str | None:
    return extract_choice(prediction, reference.get("options"))
