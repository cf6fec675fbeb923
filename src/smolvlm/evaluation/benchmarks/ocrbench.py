"""OCRBench: an answer contained in the prediction (case-insensitive; HME100k without spaces).

Data: ``echo840/OCRBench``, split ``test`` (1,000 questions). Columns read: ``answer`` (list of
accepted answers), ``dataset`` (source set; HME100k is scored without spaces), ``question_type``
(category: "Regular Text Recognition", ..., as VK and lmms-eval report it), ``question`` and
``image`` (prompt). The rows carry no id: the row id is the row's index in the split.

Prompt (exact): VK ``OCRBench`` uses ``ImageBaseDataset.build_prompt`` (image + question, no suffix);
the SmolVLM wrappers route ``OCRBench`` to ``build_prompt_default(add_brief=True)``:
``"<|im_start|>User:<image>" + question.strip() + "\\nGive a very brief answer.<end_of_utterance>\\nAssistant:"``.

Budget: 128 new tokens (lmms-eval ``ocrbench`` yaml); VK: 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import (Benchmark, BuildContext, Item, Row, image, image_from_struct, text,
                                                user_turn)


def _answers(value) -> list[str]:
    if isinstance(value, str):  # a single answer stored as a string
        return [value]
    return [str(a) for a in value]


def reference(row: Row) -> dict:
    return {"answers": _answers(row["answer"]), "dataset": str(row["dataset"]),
            "question_type": str(row["question_type"])}


def build(row: Row, ctx: BuildContext) -> Item:
    """``id`` is empty: the row id is the row's index, set by the caller."""
    img = image_from_struct(row["image"], "OCRBench image")
    return Item("", user_turn(image(img), text(row["question"].strip() + "\nGive a very brief answer.")))


BENCHMARK = Benchmark(
    name="ocrbench",
    hub_id="echo840/OCRBench",
    hub_config=None,
    split="test",
    media="image",
    text_columns=("answer", "dataset", "question_type"),
    row_id=lambda row, index: str(index),
    reference=reference,
    category=lambda row: str(row["question_type"]) if row.get("question_type") else None,
    build=build,
    max_new_tokens=128,
    published={"SmolVLM2-2.2B-Instruct": 72.9, "SmolVLM-Instruct": 65.5},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_default(add_brief=True), byte for byte; answer budget "
           "128 tokens (lmms-eval) where VLMEvalKit allows 2048. Score = correct / questions x 100 (the "
           "published 72.9 is 729 of 1000). Published: SmolVLM2 model card."),
)
