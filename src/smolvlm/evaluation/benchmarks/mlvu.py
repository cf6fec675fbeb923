"""MLVU (dev, multiple choice: M-Avg): the chosen option letter over 7 tasks.

Data: ``MLVU/MVLU`` (gated; VK's ``MLVU``): JSON annotations ``MLVU/json/<n>_<task>.json``, lists of
``{video, duration, question, candidates, answer, question_type}``. ``hub_config`` is
``MLVU/json`` and ``split`` None: every annotation file is read (``--data`` may also be the
``MLVU`` or ``json`` folder, or one file). The M-Avg tasks are ``1_plotQA`` ... ``7_topic_reasoning``;
the folder also holds the open-ended ``8_sub_scene`` and ``9_summary`` (VK's ``MLVU_OpenEnded``,
G-Avg, judged by GPT): ``keep_file`` leaves those two files out, and ``build`` refuses any other
row that is not multiple choice (see ``is_multiple_choice``). Fields read: ``candidates``,
``answer`` (the gold option's text; reference: its letter), the record's annotation file
(``_file``, set by ``dataset_files.iter_rows``: category = VK's task name, e.g. "plotQA"; row id
``<file stem>/<index>``, index = the row's index in the run's files, as ChartQA's); ``video``,
``question`` (prompt).

Videos (``--media``): VK reads ``<snapshot>/MLVU/video/<n>_<task>/<video>``. We try
``MLVU/video/<stem>/``, ``video/<stem>/``, ``<stem>/`` and ``<media>`` itself (lmms-eval's flat
copy), and raise ``FileNotFoundError`` naming every path tried.

Prompt: VK ``MLVU_MCQ.build_prompt`` gives system "Carefully watch this video and pay attention
to every detail. Based on your observations, select the best option that accurately addresses the
question.", the frames, "Question: q\\nOptions:\\n(A) c1\\n(B) c2..." and "\\nOnly give the best
option."; VK's inference names each row's sub-dataset (``MLVU_MCQ``), so ``SmolVLM2.build_prompt_video``
replaces "Options:" -> "respond ONLY with one of the multiple choice letter options (A/B/C/D):".
See ``videomme`` for how our messages differ from VK's string (turn-marker spacing and one
``<video>`` item, sampled with the checkpoint's settings, for VK's 64 frames).

Score: VK's M-Avg is correct / questions over the seven tasks (micro; lmms-eval averages the task
scores instead). Budget: 16 new tokens (lmms-eval ``mlvu_dev`` yaml); VK: 2048.
"""

from __future__ import annotations

import re
from pathlib import Path

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row
from smolvlm.evaluation.benchmarks.prompts import LETTER_OPTIONS, find_video, letter_of_text, letter_options, video_item

SYSTEM = ("Carefully watch this video and pay attention to every detail. "
          "Based on your observations, select the best option that accurately addresses the question.")
MLVU_REPLACE = (("Options:", LETTER_OPTIONS),)
MCQ_TASKS = ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")
OPEN_TASKS = ("sub_scene", "summary")


def stem_of(row: Row) -> str | None:
    f = row.get("_file")
    return Path(f).stem if f else None


def task_of(row: Row) -> str | None:
    """``1_plotQA`` -> ``plotQA`` (VK's task name)."""
    stem = stem_of(row)
    return re.sub(r"^\d+_", "", stem) if stem else None


def is_multiple_choice(row: Row) -> bool:
    """An M-Avg row (it has candidates and is not from the open-ended files)."""
    return task_of(row) not in OPEN_TASKS and isinstance(row.get("candidates"), list) and bool(row["candidates"])


def row_id(row: Row, index: int) -> str:
    return f"{stem_of(row) or 'mlvu'}/{index}"


def reference(row: Row) -> dict:
    if not is_multiple_choice(row):
        return {"answer": "", "options": {}}
    return {"answer": letter_of_text(row["answer"], row["candidates"], "MLVU answer"),
            "options": letter_options(row["candidates"])}


def video_path(row: Row, media) -> str:
    stem, name = stem_of(row), str(row["video"])
    cands = [f"MLVU/video/{stem}/{name}", f"video/{stem}/{name}", f"{stem}/{name}"] if stem else []
    cands.append(name)
    return str(find_video(media, cands, f"MLVU {stem} video {name}"))


def qa_text(row: Row) -> str:
    """VK ``MLVU_MCQ.qa_template``'s question."""
    q = f"Question: {row['question']}\nOptions:\n"
    q += "".join(f"({k}) {v}\n" for k, v in letter_options(row["candidates"]).items())
    return q.rstrip()


def build(row: Row, ctx: BuildContext) -> Item:
    """``id`` is empty: the row id includes the row's index, set by the caller."""
    if not is_multiple_choice(row):
        raise ValueError(f"MLVU {stem_of(row)}: an open-ended task (G-Avg), not part of the multiple-choice "
                         "M-Avg this task scores; evaluate a folder with the 7 M-Avg annotation files only")
    texts = [qa_text(row), "\nOnly give the best option."]
    return video_item("", video_path(row, ctx.media), SYSTEM, texts, MLVU_REPLACE)


BENCHMARK = Benchmark(
    name="mlvu",
    hub_id="MLVU/MVLU",
    hub_config="MLVU/json",
    split=None,  # MLVU/json/<n>_<task>.json
    media="video",
    text_columns=("candidates", "answer"),
    row_id=row_id,
    reference=reference,
    category=lambda row: task_of(row),
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 55.2, "SmolVLM2-500M-Video-Instruct": 47.3,
               "SmolVLM2-256M-Video-Instruct": 40.6},
    notes=("Prompt is VLMEvalKit's SmolVLM2 build_prompt_video over MLVU_MCQ.build_prompt (with its MLVU_MCQ "
           "\"Options:\" replacement); the template drops VK's join spaces around the turn markers, and frames "
           "are sampled by our processor with the checkpoint's video settings (one <video> item) instead of "
           "VK's 64 frames; M-Avg over the 7 multiple-choice tasks, micro-averaged as VK does (lmms-eval "
           "macro-averages); answer budget 16 tokens (lmms-eval) where VK allows 2048. Published: SmolVLM2 "
           "model cards."),
    overall="micro",
    keep_file=lambda path: re.sub(r"^\d+_", "", path.stem) not in OPEN_TASKS,
)
