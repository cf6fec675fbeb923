"""ScienceQA-IMG (test): the chosen option letter.

Data: ``lmms-lab/ScienceQA`` (also ``lmms-lab-encoder/ScienceQA``), config folder
``ScienceQA-IMG``, split ``test`` (2,017 questions with an image; VK's ``ScienceQA_TEST``). Columns
read: ``choices`` (list), ``answer`` (the gold option's index, int), ``hint``, ``question`` and
``image`` (prompt). Category: none. The rows carry no id: the row id is the row's index in the split.

Prompt (exact): VK ``ImageMCQDataset.build_prompt`` ("Hint: h\\n" when the hint is non-empty, then
"Question: q\\nOptions:\\nA. ...\\nPlease select the correct answer from the options above. \\n")
through ``build_prompt_puremcq``: ``"<|im_start|>User:<image>Hint: h\\nQuestion: q\\nChoices:\\nA.
...\\nAnswer with the letter.<end_of_utterance>\\nAssistant: Answer:"``. An empty hint is no hint
(VK's TSV stores it as NaN). A row without an image (not in IMG) would render ``"User: "`` where
VK writes ``"User:"``.

Budget: 16 new tokens (lmms-eval ``scienceqa_img`` yaml); VK: 2048.
"""

from __future__ import annotations

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import letter_of, letter_options, mcq_text, puremcq_item


def reference(row: Row) -> dict:
    options = letter_options(row["choices"])
    return {"answer": letter_of(row["answer"], len(options)), "options": options}


def build(row: Row, ctx: BuildContext) -> Item:
    """``id`` is empty: the row id is the row's index, set by the caller."""
    images = [image_from_struct(row["image"], "ScienceQA image")] if row.get("image") is not None else []
    hint = row.get("hint")
    hint = str(hint) if hint is not None and str(hint) != "" else None
    return puremcq_item("", images, mcq_text(row["question"], letter_options(row["choices"]), hint))


BENCHMARK = Benchmark(
    name="scienceqa",
    hub_id="lmms-lab/ScienceQA",
    hub_config="ScienceQA-IMG",
    split="test",
    media="image",
    text_columns=("choices", "answer"),
    row_id=lambda row, index: str(index),
    reference=reference,
    category=lambda row: None,
    build=build,
    max_new_tokens=16,
    published={"SmolVLM2-2.2B-Instruct": 90.0, "SmolVLM-Instruct": 84.5},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_puremcq over ImageMCQDataset.build_prompt (with the "
           "row's hint), byte for byte; answer budget 16 tokens (lmms-eval) where VLMEvalKit allows 2048. "
           "Published: SmolVLM2 model card (its v1 AI2D and ScienceQA cells both read 84.5)."),
)
