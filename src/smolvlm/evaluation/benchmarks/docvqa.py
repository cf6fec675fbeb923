"""DocVQA (validation): ANLS over the reference answers.

Data: ``lmms-lab/DocVQA`` (lmms-eval now reads the same files from ``lmms-lab-encoder/DocVQA``),
config folder ``DocVQA``, split ``validation`` (5,349 questions; VK's ``DocVQA_VAL``). Columns read:
``questionId`` (row id), ``answers`` (reference), ``question`` and ``image`` (prompt). Category: none.

Prompt (exact): VK ``ImageVQADataset.build_prompt`` (question + "\\nAnswer the question using a
single word or phrase.") through ``SmolVLM2.build_prompt_docvqa`` (same text in ``SmolVLM``):
``"<|im_start|>User:<image>Give a short and terse answer to the following question. Do not
paraphrase or reformat the text you see in the image. Do not include any full stops. Just give the
answer without additional explanation. Question: " + text.strip() + "<end_of_utterance>\\nAssistant:"``.

Budget: 32 new tokens (lmms-eval ``docvqa`` yaml); VK generates up to 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import VQA_SUFFIX, vqa_item

INSTRUCTION = (
    "Give a short and terse answer to the following question. "
    "Do not paraphrase or reformat the text you see in the image. Do not include any full stops. "
    "Just give the answer without additional explanation. Question: "
)


def row_id(row: Row, index: int) -> str:
    return str(row["questionId"])


def reference(row: Row) -> dict:
    return {"answers": [str(a) for a in row["answers"]]}


def build(row: Row, ctx: BuildContext) -> Item:
    img = image_from_struct(row["image"], f"DocVQA question {row['questionId']} image")
    return vqa_item(str(row["questionId"]), [img], INSTRUCTION, row["question"] + VQA_SUFFIX)


BENCHMARK = Benchmark(
    name="docvqa",
    hub_id="lmms-lab/DocVQA",
    hub_config="DocVQA",
    split="validation",
    media="image",
    text_columns=("questionId", "answers"),
    row_id=row_id,
    reference=reference,
    category=lambda row: None,
    build=build,
    max_new_tokens=32,
    published={"SmolVLM2-2.2B-Instruct": 79.98, "SmolVLM-Instruct": 79.7},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_docvqa, byte for byte; answer budget 32 tokens "
           "(lmms-eval) where VLMEvalKit allows 2048. Published: SmolVLM2 model card (DocVQA val)."),
)
