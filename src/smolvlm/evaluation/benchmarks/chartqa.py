"""ChartQA (test): relaxed accuracy (5% numeric tolerance, else exact match).

Data: ``lmms-lab/ChartQA`` (also ``lmms-lab-encoder/ChartQA``), split ``test`` (2,500 questions:
human + augmented; VK's ``ChartQA_TEST``). Columns read: ``answer`` (reference: ``[answer]``),
``type`` (category: ``human_test`` / ``augmented_test``), ``question`` and ``image`` (prompt). The
rows carry no id: the row id is the row's index in the split (files in sorted order).

Prompt (exact for SmolVLM2): VK ``ImageVQADataset.build_prompt`` (question + "\\nAnswer the question
using a single word or phrase.") through ``SmolVLM2.build_prompt_chartqa``: ``"<|im_start|>User:
<image>For the question below, follow the following instructions:\\n-The answer should contain as
few words as possible.\\n-Don't paraphrase ...\\nQuestion: " + text.strip() +
"<end_of_utterance>\\nAssistant:"``. VK's v1 wrapper (``SmolVLM.build_prompt_chartqa``) writes the
two "Don't" with a typographic apostrophe (U+2019); we use SmolVLM2's ASCII one for every checkpoint.

Budget: 16 new tokens (lmms-eval ``chartqa`` yaml); VK: 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import VQA_SUFFIX, vqa_item

INSTRUCTION = (
    "For the question below, follow the following instructions:\n"
    "-The answer should contain as few words as possible.\n"
    "-Don't paraphrase or reformat the text you see in the image.\n"
    "-Answer a binary question with Yes or No.\n"
    "-When asked to give a numerical value, provide a number like 2 instead of Two.\n"
    "-If the final answer has two or more items, provide it in the list format like [1, 2].\n"
    "-When asked to give a ratio, give out the decimal value like 0.25 instead of 1:4.\n"
    "-When asked to give a percentage, give out the whole value like 17 instead of decimal like 0.17%.\n"
    "-Don't include any units in the answer.\n"
    "-Do not include any full stops at the end of the answer.\n"
    "-Try to include the full label from the graph when asked about an entity.\n"
    "Question: "
)


def row_id(row: Row, index: int) -> str:
    return str(index)


def reference(row: Row) -> dict:
    return {"answers": [str(row["answer"])]}


def category(row: Row) -> str | None:
    return row.get("type") or None


def build(row: Row, ctx: BuildContext) -> Item:
    """The item's ``id`` is empty: the row id is the row's index, which only the caller knows
    (it sets ``id = row_id(row, index)``)."""
    img = image_from_struct(row["image"], "ChartQA image")
    return vqa_item("", [img], INSTRUCTION, row["question"] + VQA_SUFFIX)


BENCHMARK = Benchmark(
    name="chartqa",
    hub_id="lmms-lab/ChartQA",
    hub_config=None,
    split="test",
    media="image",
    text_columns=("answer", "type"),
    row_id=row_id,
    reference=reference,
    category=category,
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 68.84, "SmolVLM-Instruct": 71.6},
    notes=("Prompt is VLMEvalKit's SmolVLM2 build_prompt_chartqa, byte for byte (its v1 wrapper writes "
           "\"Don't\" with U+2019; we use the ASCII apostrophe for every checkpoint); answer budget 16 tokens "
           "(lmms-eval) where VLMEvalKit allows 2048. Published: SmolVLM2 model card (ChartQA test)."),
)
