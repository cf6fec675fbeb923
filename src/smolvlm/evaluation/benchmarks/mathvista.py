"""MathVista (testmini): rule-based answer extraction (both references use a GPT judge).

Data: ``AI4Math/MathVista``, split ``testmini`` (1,000 questions; files
``data/testmini-*.parquet``; VK's ``MathVista_MINI``). Columns read: ``pid`` (row id),
``question_type`` (``multi_choice`` / ``free_form``), ``answer_type``, ``answer``, ``choices``,
``precision``, ``unit`` (reference), ``metadata`` (category: its ``task``, e.g. "figure question
answering"), ``query`` and ``decoded_image`` (prompt).

Prompt (exact): VK's ``MathVista_MINI`` TSV ``question`` is the hub's ``query`` (the "Hint: ...\\n
Question: ...\\nChoices:\\n(A) ..." text; assumed: the TSV could not be read here, VK's judge prompts
use the same format) and ``ImageBaseDataset.build_prompt`` sends it as is; ``build_prompt_mathvista``
strips it, replaces "(A) " ... "(H) " -> "A. " ... "H. ", "\\nOptions:" -> "\\nChoices:", "Hint: " ->
"" (in that order), strips again: ``"<|im_start|>User:<image>" + text + "<end_of_utterance>\\nAssistant:"``
+ ``" Answer:"`` when the prompt contains both "A." and "B.".

Budget: 2048 new tokens (VK's). lmms-eval's ``mathvista_testmini_format`` yaml says 16384 (1024
before 2025-07), which no short-answer prompt needs.
"""

from __future__ import annotations

import math
from typing import Any

from smolvlm.evaluation.benchmarks.base import (Benchmark, BuildContext, Item, Row, image, image_from_struct, text,
                                                user_turn)
from smolvlm.evaluation.benchmarks.prompts import replace_all

MATHVISTA_REPLACE = tuple((f"({c}) ", f"{c}. ") for c in "ABCDEFGH") + (("\nOptions:", "\nChoices:"), ("Hint: ", ""))


def _precision(value: Any) -> int | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


def _opt_str(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def reference(row: Row) -> dict:
    choices = row.get("choices")
    return {"question_type": str(row["question_type"]), "answer_type": str(row["answer_type"]),
            "answer": str(row["answer"]), "choices": [str(c) for c in choices] if choices is not None else None,
            "precision": _precision(row.get("precision")), "unit": _opt_str(row.get("unit"))}


def category(row: Row) -> str | None:
    meta = row.get("metadata")
    return str(meta["task"]) if isinstance(meta, dict) and meta.get("task") else None


def build(row: Row, ctx: BuildContext) -> Item:
    pid = str(row["pid"])
    img = image_from_struct(row["decoded_image"], f"MathVista {pid} decoded_image")
    body = replace_all(str(row["query"]).strip(), MATHVISTA_REPLACE).strip()
    return Item(pid, user_turn(image(img), text(body)),
                answer_prefix=" Answer:" if "A." in body and "B." in body else "")


BENCHMARK = Benchmark(
    name="mathvista",
    hub_id="AI4Math/MathVista",
    hub_config=None,
    split="testmini",
    media="image",
    text_columns=("pid", "question_type", "answer_type", "answer", "choices", "precision", "unit", "metadata"),
    row_id=lambda row, index: str(row["pid"]),
    reference=reference,
    category=category,
    build=build,
    max_new_tokens=2048,
    published={"SmolVLM2-2.2B-Instruct": 51.5, "SmolVLM-Instruct": 43.9},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_mathvista over the hub's query text (taken to be VK's "
           "TSV question); answers are extracted by rule where both references ask GPT; budget 2048 tokens "
           "(VLMEvalKit's; lmms-eval's yaml says 16384). Published: SmolVLM2 model card (testmini); the "
           "SmolVLM blog (2024-11) gives 44.6 for SmolVLM 2B."),
)
