"""TextVQA (validation): VQA accuracy over the 10 human answers.

Data: ``lmms-lab/textvqa`` (also ``lmms-lab-encoder/textvqa``), split ``validation`` (5,000
questions; VK's ``TextVQA_VAL``). Columns read: ``question_id`` (row id), ``answers`` (reference),
``question`` and ``image`` (prompt). Category: none.

Prompt (exact): VK ``ImageVQADataset.build_prompt`` (question + "\\nAnswer the question using a
single word or phrase.") through ``SmolVLM2.build_prompt_textvqa`` (same in ``SmolVLM``):
``"<|im_start|>User:<image>Answer the following question about the image using as few words as
possible. Follow these additional instructions:\\n-Always answer ...\\nQuestion: " + text.strip() +
"<end_of_utterance>\\nAssistant:"``.

Budget: the lmms-eval ``textvqa`` yaml sets none (``until: ASSISTANT:`` only), so lmms-eval's model
default applies: 1024 (its idefics2 wrapper). VK: 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import VQA_SUFFIX, vqa_item

INSTRUCTION = (
    "Answer the following question about the image using as few words as possible. "
    "Follow these additional instructions:\n"
    "-Always answer a binary question with Yes or No.\n"
    "-When asked what time it is, reply with the time seen in the image.\n"
    "-Do not put any full stops at the end of the answer.\n"
    "-Do not put quotation marks around the answer.\n"
    "-An answer with one or two words is favorable.\n"
    "-Do not apply common sense knowledge. The answer can be found in the image.\n"
    "Question: "
)


def row_id(row: Row, index: int) -> str:
    return str(row["question_id"])


def reference(row: Row) -> dict:
    return {"answers": [str(a) for a in row["answers"]]}


def build(row: Row, ctx: BuildContext) -> Item:
    img = image_from_struct(row["image"], f"TextVQA question {row['question_id']} image")
    return vqa_item(str(row["question_id"]), [img], INSTRUCTION, row["question"] + VQA_SUFFIX)


BENCHMARK = Benchmark(
    name="textvqa",
    hub_id="lmms-lab/textvqa",
    hub_config=None,
    split="validation",
    media="image",
    text_columns=("question_id", "answers"),
    row_id=row_id,
    reference=reference,
    category=lambda row: None,
    build=build,
    max_new_tokens=1024,
    published={"SmolVLM2-2.2B-Instruct": 73.21, "SmolVLM-Instruct": 72.1},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_textvqa, byte for byte; answer budget 1024 tokens "
           "(lmms-eval's yaml sets none, its model default) where VLMEvalKit allows 2048. Published: "
           "SmolVLM2 model card (TextVQA val); the SmolVLM blog (2024-11) gives 72.7 for SmolVLM 2B."),
)
