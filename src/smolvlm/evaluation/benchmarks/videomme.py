"""Video-MME (without subtitles): the first option letter of the answer.

Data: ``lmms-lab/Video-MME`` (lmms-eval now names it ``lmms-eval/Video-MME``), config folder
``videomme``, split ``test`` (2,700 questions, 900 videos; file
``videomme/test-00000-of-00001.parquet``). Columns read: ``question_id`` (row id, "001-1"),
``options`` (list of "A. ..." strings), ``answer`` (letter), ``duration`` (category: short /
medium / long, the paper's breakdown), ``videoID``, ``question`` (prompt).

Videos (``--media``): the hub ships them as zips; lmms-eval unpacks them to ``<media>/data/``, VK
to ``<media>/video/``. We look for ``<videoID>.mp4`` (then ``.MP4``, ``.mkv``) in ``data/``,
``video/``, ``videos/`` and ``<media>`` itself, and raise ``FileNotFoundError`` naming every path
tried.

Prompt: VK ``VideoMME.build_prompt`` (video_llm False: frames as images) gives the messages
``["" , "These are the frames of a video. Select the best answer ... (A, B, C, or D) of the correct
option.", "Question: q\\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer: "]`` with no system message;
``SmolVLM2.build_prompt_video`` joins them with VK's default system "pay attention to the video
and answer the question" (Video-MME: "Options:" -> "Choices:" only when present, which it is not).
VK's string (64 frames):
``"<|im_start|>System: pay attention to the video and answer the question <end_of_utterance>\\n
<|im_start|>User: Here are some frames sampled from a video:\\n Frame from 00:00: <image> ... Frame
from 01:03: <image> \\n  These are the frames ... option. Question: q\\nA. ...\\nD. ...\\nAnswer:
<end_of_utterance> \\nAssistant:"``. Ours (``prompts.video_item``) keeps every character of that
inside the turns; it differs only where the template writes its own markup: ``"\\n
<|im_start|>User:"`` -> ``"\\nUser:"``, ``" \\nAssistant:"`` -> ``"\\nAssistant:"``, and the 64
``"Frame from MM:SS: <image>"`` pairs (MM:SS = the frame's number) -> one ``<video>``, which our
processor samples with the checkpoint's SmolVLM2 video settings (fps / max_frames from
``preprocessor_config.json``, real timestamps) instead of VK's 64 evenly spaced frames at 384 px
(2.2B) / 512 px (256M, 500M) with image splitting off.

Budget: 16 new tokens (lmms-eval ``videomme`` yaml); VK: 2048.
"""

from __future__ import annotations

import re
from typing import Any

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row
from smolvlm.evaluation.benchmarks.prompts import LETTERS, PLEASE_SELECT, find_video, video_item

FRAMES_TMPL_NOSUB = (
    "\nThese are the frames of a video. "
    "Select the best answer to the following multiple-choice question based on the video. "
    "Respond with only the letter (A, B, C, or D) of the correct option.\n"
)
VIDEOMME_REPLACE = (("Options:", "Choices:"), (PLEASE_SELECT, "Answer with the letter."))
FOLDERS = ("data", "video", "videos", "")
SUFFIXES = (".mp4", ".MP4", ".mkv")


def options_of(row: Row) -> dict[str, str]:
    """``["A. Apples.", "B. Pears."]`` -> ``{"A": "Apples.", "B": "Pears."}`` (unlettered: by position)."""
    out: dict[str, str] = {}
    for i, opt in enumerate(row["options"]):
        m = re.match(r"^\s*([A-Z])\.\s?(.*)$", str(opt), re.S)
        if m:
            out[m.group(1)] = m.group(2)
        else:
            out[LETTERS[i]] = str(opt)
    return out


def reference(row: Row) -> dict:
    return {"answer": str(row["answer"]).strip(), "options": options_of(row)}


def video_path(row: Row, media: Any) -> str:
    vid = str(row["videoID"])
    cands = [f"{d}/{vid}{s}" if d else f"{vid}{s}" for d in FOLDERS for s in SUFFIXES]
    return str(find_video(media, cands, f"Video-MME {row['question_id']} (videoID {vid})"))


def build(row: Row, ctx: BuildContext) -> Item:
    question = str(row["question"]) + "\n" + "\n".join(str(o) for o in row["options"])
    prompt = f"Question: {question}\nAnswer: "
    texts = ["", FRAMES_TMPL_NOSUB, prompt]
    replace = VIDEOMME_REPLACE if any("Options:" in t for t in texts) else ()
    return video_item(str(row["question_id"]), video_path(row, ctx.media), None, texts, replace)


BENCHMARK = Benchmark(
    name="videomme",
    hub_id="lmms-lab/Video-MME",
    hub_config="videomme",
    split="test",
    media="video",
    text_columns=("question_id", "options", "answer", "duration"),
    row_id=lambda row, index: str(row["question_id"]),
    reference=reference,
    category=lambda row: str(row["duration"]) if row.get("duration") else None,
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 52.1, "SmolVLM2-500M-Video-Instruct": 42.2,
               "SmolVLM2-256M-Video-Instruct": 33.7},
    notes=("Prompt is VLMEvalKit's SmolVLM2 build_prompt_video over VideoMME.build_prompt (no subtitles); the "
           "template drops VK's join spaces around the turn markers (\"\\n <|im_start|>User:\" -> \"\\nUser:\", "
           "\" \\nAssistant:\" -> \"\\nAssistant:\"), and frames are sampled by our processor with the "
           "checkpoint's video settings (one <video> item, real timestamps) instead of VK's 64 frames at "
           "384/512 px labelled 00:00, 00:01, ...; answer budget 16 tokens (lmms-eval) where VK allows 2048. "
           "Published: SmolVLM2 model cards."),
)
