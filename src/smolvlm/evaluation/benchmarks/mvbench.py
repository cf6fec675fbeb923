"""MVBench: the chosen option letter, over 20 tasks.

Data: ``OpenGVLab/MVBench``: JSON annotations ``json/<task>.json`` (one list of
``{video, question, candidates, answer[, start, end]}`` records per task; lmms-eval loads each as
config ``<task>``, split ``train``; VK's ``MVBench`` reads the same files). ``hub_config`` is
``json`` and ``split`` None: every annotation file is read (a single ``.json`` file works too).
Fields read: ``candidates``, ``answer`` (the gold option's text; reference: its letter) and the
record's annotation file (``_file``, set by ``dataset_files.iter_rows``: category = the task, as
VK names it, e.g. "Action Antonym"; row id ``<task>/<index>``); ``video``, ``question`` (prompt).
The records carry no id: ``<index>`` is the row's index in the run's files (sorted by name), so ids
are stable for one ``--data`` folder, as ChartQA's.

Videos (``--media``): lmms-eval's copy (the repo's ``video`` branch, unzipped) keeps them under a
per-task folder, e.g. ``ssv2_video_mp4/``, ``star/Charades_segment/`` (clips already cut to the
question's start/end); VK's (``main`` branch) under ``video/<folder>/``, e.g.
``video/ssv2_video/``, ``video/star/Charades_v1_480/`` (whole videos, which VK cuts to
``start``/``end`` itself). We try lmms-eval's folder, its ``data0613/`` variant, then VK's, each
under ``<media>`` and ``<media>/video``, with the annotation's file name and with an ``.mp4``
suffix; then ``<media>/<video>``. ``FileNotFoundError`` names every path tried. The NTU RGB+D
videos of ``fine_grained_pose`` were withdrawn from the hub: those rows fail with that error.

Prompt: VK ``MVBench.build_prompt`` gives system SYS ("Carefully watch the video and pay attention
to the cause and sequence of events, ... addresses the question.\\n"), the frames, "Question:
q\\nOptions:\\n(A) c1\\n(B) c2...", "\\nOnly give the best option.", and the assistant-role "Best
option:(" (which ``build_prompt_video`` treats as user text); ``SmolVLM2.build_prompt_video``
joins them with ``" "`` and replaces "Options:" -> "respond ONLY with one of the multiple choice
letter options (A/B/C/D):" and "Best option:(" -> "Answer:". See ``videomme`` for how our messages
differ from VK's string (turn-marker spacing and the ``<video>`` item for VK's 8 frames --
``MVBench`` fixes ``nframe`` at 8 -- labelled 00:00 ... 00:07). Clips with start/end are sampled
whole: right for lmms-eval's pre-cut clips, the whole video for VK's layout.

Budget: 16 new tokens (lmms-eval ``mvbench`` template); VK: 2048.
"""

from __future__ import annotations

from pathlib import Path

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row
from smolvlm.evaluation.benchmarks.prompts import (LETTER_OPTIONS, find_video, letter_of_text, letter_options,
                                                   video_item, with_suffixes)

SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, "
    "the detail and movement of objects, and the action and pose of persons. "
    "Based on your observations, select the best option that accurately addresses the question.\n"
)
MVBENCH_REPLACE = (("Options:", LETTER_OPTIONS), ("Best option:(", "Answer:"))

# task (annotation file stem) -> (VK's task name, lmms-eval's video folder, VK's video folder)
TASKS: dict[str, tuple[str, str, str]] = {
    "action_sequence": ("Action Sequence", "star/Charades_segment", "star/Charades_v1_480"),
    "action_prediction": ("Action Prediction", "star/Charades_segment", "star/Charades_v1_480"),
    "action_antonym": ("Action Antonym", "ssv2_video_mp4", "ssv2_video"),
    "fine_grained_action": ("Fine-grained Action", "Moments_in_Time_Raw/videos", "Moments_in_Time_Raw/videos"),
    "unexpected_action": ("Unexpected Action", "FunQA_test/test", "FunQA_test/test"),
    "object_existence": ("Object Existence", "clevrer/video_validation", "clevrer/video_validation"),
    "object_interaction": ("Object Interaction", "star/Charades_segment", "star/Charades_v1_480"),
    "object_shuffle": ("Object Shuffle", "perception/videos", "perception/videos"),
    "moving_direction": ("Moving Direction", "clevrer/video_validation", "clevrer/video_validation"),
    "action_localization": ("Action Localization", "sta/sta_video_segment", "sta/sta_video"),
    "scene_transition": ("Scene Transition", "scene_qa/video", "scene_qa/video"),
    "action_count": ("Action Count", "perception/videos", "perception/videos"),
    "moving_count": ("Moving Count", "clevrer/video_validation", "clevrer/video_validation"),
    "moving_attribute": ("Moving Attribute", "clevrer/video_validation", "clevrer/video_validation"),
    "state_change": ("State Change", "perception/videos", "perception/videos"),
    "fine_grained_pose": ("Fine-grained Pose", "nturgbd_convert", "nturgbd"),
    "character_order": ("Character Order", "perception/videos", "perception/videos"),
    "egocentric_navigation": ("Egocentric Navigation", "vlnqa", "vlnqa"),
    "episodic_reasoning": ("Episodic Reasoning", "tvqa/video_fps3_hq_segment", "tvqa/frames_fps3_hq"),
    "counterfactual_inference": ("Counterfactual Inference", "clevrer/video_validation", "clevrer/video_validation"),
}


def task_of(row: Row) -> str | None:
    f = row.get("_file")
    return Path(f).stem if f else None


def category(row: Row) -> str | None:
    task = task_of(row)
    return TASKS[task][0] if task in TASKS else task


def row_id(row: Row, index: int) -> str:
    return f"{task_of(row) or 'mvbench'}/{index}"


def reference(row: Row) -> dict:
    return {"answer": letter_of_text(row["answer"], row["candidates"], "MVBench answer"),
            "options": letter_options(row["candidates"])}


def video_path(row: Row, media) -> str:
    task, name = task_of(row), str(row["video"])
    folders: list[str] = []
    if task in TASKS:
        _, le, vk = TASKS[task]
        folders = [le, f"data0613/{le}", vk]
    names = with_suffixes(name, (".mp4",))
    cands = [f"{base}{folder}/{n}" for folder in folders for base in ("", "video/") for n in names]
    cands += names
    return str(find_video(media, cands, f"MVBench {task} video {name}"))


def qa_text(row: Row) -> str:
    """VK ``MVBench.qa_template``'s question."""
    q = f"Question: {row['question']}\nOptions:\n"
    q += "".join(f"({k}) {v}\n" for k, v in letter_options(row["candidates"]).items())
    return q.rstrip()


def build(row: Row, ctx: BuildContext) -> Item:
    """``id`` is empty: the row id includes the row's index, set by the caller."""
    texts = [qa_text(row), "\nOnly give the best option.", "Best option:("]
    replace = MVBENCH_REPLACE if any("Options:" in t for t in texts) else ()
    return video_item("", video_path(row, ctx.media), SYSTEM, texts, replace)


BENCHMARK = Benchmark(
    name="mvbench",
    hub_id="OpenGVLab/MVBench",
    hub_config="json",
    split=None,  # json/<task>.json: lmms-eval's config <task>, split "train"
    media="video",
    text_columns=("candidates", "answer"),
    row_id=row_id,
    reference=reference,
    category=category,
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 46.27, "SmolVLM2-500M-Video-Instruct": 39.73,
               "SmolVLM2-256M-Video-Instruct": 32.7},
    notes=("Prompt is VLMEvalKit's SmolVLM2 build_prompt_video over MVBench.build_prompt (with its "
           "\"Options:\" and \"Best option:(\" replacements); the template drops VK's join spaces around the "
           "turn markers, and frames are sampled by our processor with the checkpoint's video settings (one "
           "<video> item) instead of VK's 8 frames; start/end bounds are not applied (lmms-eval's video-branch "
           "clips are pre-cut); answer budget 16 tokens (lmms-eval) where VK allows 2048. Published: SmolVLM2 "
           "model cards."),
)
