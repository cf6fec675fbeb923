"""AI2D (test): the chosen option letter.

Data: ``lmms-lab/ai2d`` (also ``lmms-lab-encoder/ai2d``; the masked-diagram version, as VK's
``AI2D_TEST``), split ``test`` (3,088 questions). Columns read: ``options`` (list),
``answer`` (the gold option's index, stored as a string), ``question`` and ``image`` (prompt).
Category: none. The rows carry no id: the row id is the row's index in the split.

Prompt (exact): VK ``ImageMCQDataset.build_prompt`` ("Question: q\\nOptions:\\nA. ...\\nPlease select
the correct answer from the options above. \\n"; AI2D has no hint) through
``build_prompt_puremcq``: ``"<|im_start|>User:<image>Question: q\\nChoices:\\nA. ...\\nAnswer with the
letter.<end_of_utterance>\\nAssistant: Answer:"`` (our ``answer_prefix`` is ``" Answer:"``).

Budget: 16 new tokens (lmms-eval ``ai2d`` yaml); VK: 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import letter_of, letter_options, mcq_text, puremcq_item


def reference(row: Row) -> dict:
    options = letter_options(row["options"])
    return {"answer": letter_of(row["answer"], len(options)), "options": options}


def build(row: Row, ctx: BuildContext) -> Item:
    """``id`` is empty: the row id is the row's index, set by the caller."""
    img = image_from_struct(row["image"], "AI2D image")
    return puremcq_item("", [img], mcq_text(row["question"], letter_options(row["options"])))


BENCHMARK = Benchmark(
    name="ai2d",
    hub_id="lmms-lab/ai2d",
    hub_config=None,
    split="test",
    media="image",
    text_columns=("options", "answer"),
    row_id=lambda row, index: str(index),
    reference=reference,
    category=lambda row: None,
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 70.0, "SmolVLM-Instruct": 84.5},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_puremcq over ImageMCQDataset.build_prompt, byte for "
           "byte; answer budget 16 tokens (lmms-eval) where VLMEvalKit allows 2048. Published: SmolVLM2 model "
           "card; its SmolVLM (v1) AI2D and ScienceQA cells both read 84.5 (checked against the card; the "
           "AI2D one looks like a copy of the ScienceQA cell)."),
)
