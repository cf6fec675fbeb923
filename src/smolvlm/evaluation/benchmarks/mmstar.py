"""MMStar (val): the chosen option letter.

Data: ``Lin-Chen/MMStar``: one file, ``mmstar.parquet``, which the dataset card declares as split
``val`` (1,500 questions). Its name carries no split, so ``split`` is None: every data file of
``--data`` is read (the parquet-converter's ``val/0000.parquet`` layout works too). Columns read:
``index`` (row id), ``question`` (stem + ``"\\nOptions: A: ..., B: ..., C: ..., D: ..."``),
``answer`` (letter), ``category`` (category, the six core capabilities), ``image`` (prompt).

Prompt: VK's ``MMStar.tsv`` keeps the stem in ``question`` and the options in A-D columns;
``ImageMCQDataset.build_prompt`` then writes "Question: stem\\nOptions:\\nA. ...\\nPlease select the
correct answer from the options above. \\n", and ``build_prompt_puremcq`` makes it
``"<|im_start|>User:<image>Question: stem\\nChoices:\\nA. ...\\nAnswer with the
letter.<end_of_utterance>\\nAssistant: Answer:"``. We split the hub question back into stem and
options (``split_question``: at the last "Options:", then at ", B: ", ", C: ", ...); that the TSV
holds exactly these strings is an assumption (its file could not be read here). A question
without a parseable "Options:" list is asked as is, with no options.

Budget: lmms-eval's ``mmstar`` yaml sets none (its model default is 1024); VK: 2048.
"""

from __future__ import annotations

import re

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image_from_struct
from smolvlm.evaluation.benchmarks.prompts import LETTERS, mcq_text, puremcq_item


def split_question(question: str) -> tuple[str, dict[str, str]]:
    """``"stem\\nOptions: A: x, B: y"`` -> ``("stem", {"A": "x", "B": "y"})``; no list -> ``(question, {})``."""
    at = question.rfind("Options:")
    if at < 0:
        return question, {}
    stem, rest = question[:at].rstrip(), question[at + len("Options:"):].strip()
    m = re.match(r"A\s*:\s?", rest)
    if not m:
        return question, {}
    options: dict[str, str] = {}
    pos, letter = m.end(), 0
    while True:
        nxt = LETTERS[letter + 1] if letter + 1 < len(LETTERS) else None
        m2 = re.search(rf",\s*{nxt}\s*:\s?", rest[pos:]) if nxt else None
        if not m2:
            options[LETTERS[letter]] = rest[pos:].strip()
            break
        options[LETTERS[letter]] = rest[pos:pos + m2.start()].strip()
        pos, letter = pos + m2.end(), letter + 1
    if len(options) < 2:
        return question, {}
    return stem, options


def reference(row: Row) -> dict:
    _, options = split_question(str(row["question"]))
    return {"answer": str(row["answer"]).strip(), "options": options}


def build(row: Row, ctx: BuildContext) -> Item:
    stem, options = split_question(str(row["question"]))
    img = image_from_struct(row["image"], f"MMStar question {row['index']} image")
    return puremcq_item(str(row["index"]), [img], mcq_text(stem, options))


BENCHMARK = Benchmark(
    name="mmstar",
    hub_id="Lin-Chen/MMStar",
    hub_config=None,
    split=None,  # mmstar.parquet: the val split, by the dataset card
    media="image",
    text_columns=("index", "question", "answer", "category"),
    row_id=lambda row, index: str(row["index"]),
    reference=reference,
    category=lambda row: str(row["category"]) if row.get("category") else None,
    build=build,
    max_new_tokens=1024,
    published={"SmolVLM2-2.2B-Instruct": 46.0, "SmolVLM-Instruct": 41.8},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_puremcq over ImageMCQDataset.build_prompt, with the "
           "options split out of the hub question (VK's TSV stores them as A-D columns: assumed identical); "
           "answer budget 1024 tokens (lmms-eval's default) where VLMEvalKit allows 2048. Published: SmolVLM2 "
           "model card; the SmolVLM blog (2024-11) gives 42.1 for SmolVLM 2B."),
)
