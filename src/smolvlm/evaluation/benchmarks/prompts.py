"""VLMEvalKit's prompt text, shared by the benchmark modules.

VLMEvalKit (VK) builds a prompt in two steps: the dataset's ``build_prompt`` makes a message list
(images + text), then the model wrapper -- here ``vlmeval/vlm/smolvlm.py`` (``SmolVLM`` for v1,
``SmolVLM2``) -- turns it into one string with a per-dataset ``build_prompt_*``. The helpers below
reproduce both steps as chat messages which the checkpoint's template renders to VK's string:

* ``mcq_text``: ``ImageMCQDataset.build_prompt`` ("Hint: ...\\nQuestion: ...\\nOptions:\\nA. ...\\n
  Please select the correct answer from the options above. \\n").
* ``puremcq_item``: ``build_prompt_puremcq`` (MMStar, AI2D, ScienceQA): ``"<|im_start|>User:" +
  "<image>" per image + stripped text with "\\nOptions:" -> "\\nChoices:" and the "Please select"
  line -> "Answer with the letter." + "<end_of_utterance>\\nAssistant: Answer:"``.
* ``vqa_item``: ``build_prompt_docvqa`` / ``_textvqa`` / ``_chartqa`` / ``_default``: a fixed
  instruction, then the stripped dataset text (``ImageVQADataset.build_prompt`` appends
  ``VQA_SUFFIX`` to the question for DocVQA, TextVQA and ChartQA).
* ``video_item``: SmolVLM2 ``build_prompt_video`` (``" ".join`` of its parts; see the function).

The template renders a user turn as ``"User" + (":" if the first item is an image else ": ")``;
VK's ``"<|im_start|>User:" + "<image>"`` is therefore exact whenever the row has an image.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from smolvlm.evaluation.benchmarks.base import Item, image, text, user_turn, video

LETTERS = string.ascii_uppercase

# ImageVQADataset.build_prompt: appended to the question of DocVQA, TextVQA, ChartQA (not OCRBench).
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."

PLEASE_SELECT = "Please select the correct answer from the options above."
PUREMCQ_REPLACE = (("\nOptions:", "\nChoices:"), (PLEASE_SELECT, "Answer with the letter."))


def replace_all(s: str, pairs: Iterable[tuple[str, str]]) -> str:
    """``str.replace`` for each pair in order (VK iterates its ``replace_mapping`` dict in order)."""
    for old, new in pairs:
        s = s.replace(old, new)
    return s


def letter_options(choices: Sequence[Any]) -> dict[str, str]:
    """``["x", "y"]`` -> ``{"A": "x", "B": "y"}`` (VK's TSVs store options as A, B, ... columns)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} options: more than {len(LETTERS)} letters")
    return {LETTERS[i]: str(c) for i, c in enumerate(choices)}


def letter_of(index: Any, n: int, what: str = "answer") -> str:
    """The gold letter of an option index (AI2D stores it as a string, ScienceQA as an int)."""
    try:
        i = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {index!r} is not an option index") from None
    if not 0 <= i < n:
        raise ValueError(f"{what} {i} is out of range for {n} options")
    return LETTERS[i]


def letter_of_text(answer: Any, candidates: Sequence[Any], what: str = "answer") -> str:
    """The letter of the candidate equal to ``answer`` (MVBench, MLVU store the answer's text)."""
    for i, c in enumerate(candidates):
        if c == answer:
            return LETTERS[i]
    raise ValueError(f"{what} {answer!r} is not one of the {len(candidates)} candidates")


def mcq_text(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """``ImageMCQDataset.build_prompt``'s text: hint, question, lettered options, instruction."""
    prompt = f"Hint: {hint}\n" if hint is not None else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
        prompt += PLEASE_SELECT + " \n"
    return prompt


def puremcq_item(item_id: str, images: Sequence[Any], prompt: str) -> Item:
    """``build_prompt_puremcq``: the images, then the stripped text with VK's replacements, and the
    assistant turn opened with ``" Answer:"``. Exact when the row has an image (the template writes
    ``"User: "`` before a text-first turn where VK writes ``"User:"``)."""
    instruction = replace_all(prompt.strip(), PUREMCQ_REPLACE)
    return Item(item_id, user_turn(*(image(i) for i in images), text(instruction)), answer_prefix=" Answer:")


def vqa_item(item_id: str, images: Sequence[Any], instruction: str, dataset_text: str) -> Item:
    """``build_prompt_docvqa``-style: ``"<|im_start|>User:" + "<image>" + instruction +
    dataset_text.strip() + "<end_of_utterance>\\nAssistant:"``."""
    return Item(item_id, user_turn(*(image(i) for i in images), text(instruction + dataset_text.strip())))


# -- video ---------------------------------------------------------------------------------------
VIDEO_DEFAULT_SYSTEM = "pay attention to the video and answer the question"
VIDEO_INTRO = "Here are some frames sampled from a video:\n"
LETTER_OPTIONS = "respond ONLY with one of the multiple choice letter options (A/B/C/D):"


def video_item(item_id: str, path: str | Path, system: str | None, texts: Sequence[str],
               replace: Sequence[tuple[str, str]] = ()) -> Item:
    """SmolVLM2 ``build_prompt_video`` as chat messages.

    VK joins ``["<|im_start|>System:", system, "<end_of_utterance>\\n", "<|im_start|>User:",
    "Here are some frames sampled from a video:\\n", "Frame from 00:00:", "<image>", ..., "\\n",
    *texts (each stripped), "<end_of_utterance>", "\\nAssistant:"]`` with ``" "`` and then applies
    the dataset's replacements to the whole string. ``system`` is the dataset's system message
    (as VK passes it, not stripped), or None for VK's default. ``texts``: the dataset's non-system
    text messages in order.

    We keep every character of that string inside the turns: system text ``system + " "``, user
    turn ``"Here are some frames sampled from a video:\\n "`` + video + ``" \\n " + " ".join(texts)
    + " "``. What the template cannot write: VK's ``"\\n <|im_start|>User:"`` is rendered
    ``"\\nUser:"`` (the template opens ``<|im_start|>`` once), its ``"<end_of_utterance> \\nAssistant:"``
    is ``"<end_of_utterance>\\nAssistant:"``, and VK's 64 ``"Frame from MM:SS: <image>"`` pairs
    (timestamps = frame numbers) are our ``<video>`` item, which the processor expands with the
    checkpoint's own layout (sampled frames, real timestamps).
    """
    sys_text = (VIDEO_DEFAULT_SYSTEM if system is None else system) + " "
    head = VIDEO_INTRO + " "
    tail = " \n " + " ".join(t.strip() for t in texts) + " "
    sys_text, head, tail = (replace_all(s, replace) for s in (sys_text, head, tail))
    return Item(item_id, user_turn(text(head), video(path), text(tail), system=sys_text))


def find_video(media: Path | None, candidates: Iterable[str | Path], what: str) -> Path:
    """The first candidate (relative to ``media``) that is a file, else ``FileNotFoundError``
    naming every path tried. ``media``: the ``--media`` folder."""
    if media is None:
        raise FileNotFoundError(f"{what}: no --media folder given (the folder of the benchmark's videos)")
    media = Path(media).expanduser()
    tried: list[Path] = []
    for c in candidates:
        p = media / c
        if p in tried:
            continue
        tried.append(p)
        if p.is_file():
            return p
    raise FileNotFoundError(f"{what}: video not found; tried {', '.join(str(p) for p in tried)}")


def with_suffixes(name: str, suffixes: Sequence[str]) -> list[str]:
    """``name`` and the same stem with each of ``suffixes`` (``a.webm`` -> ``a.webm``, ``a.mp4``)."""
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", name)
    out = [name]
    out += [stem + s for s in suffixes if stem + s != name]
    return out
