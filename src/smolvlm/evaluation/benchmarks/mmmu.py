"""MMMU (validation): multiple-choice letter or open answer, MMMU's rule-based parsing.

Data: ``MMMU/MMMU`` (also ``lmms-lab-encoder/MMMU``): one config folder per subject (30), split
``validation`` (900 questions; the validation half of VK's ``MMMU_DEV_VAL``, which VK scores).
``hub_config`` is None: every subject's ``validation-*.parquet`` is read. Columns read: ``id`` (row
id; category = the subject inside it, ``validation_Art_Theory_3`` -> ``Art_Theory``),
``question_type``, ``answer``, ``options`` (a stringified list), ``question`` and ``image_1`` ...
``image_7`` (prompt).

Prompt (exact): VK ``MMMUDataset.build_prompt``: ``ImageMCQDataset.build_prompt``'s text
("Question: q\\nOptions:\\nA. ...\\nPlease select the correct answer from the options above. \\n";
open questions: "Question: q\\n") split at its ``<image k>`` markers into text and image messages
(``split_MMMU``: image k is ``image_k``; an image the text does not mention is dropped, one it
mentions twice is sent twice; text without markers: all images first), then
``build_prompt_mmmu``: ``"<|im_start|>User: Question: "`` + ``"<image c>:<image>\\n"`` per image
message (c counts them) + for each message in order ``" <image c> "`` or its stripped text with
"Question:" removed, "Please select ..." -> "Answer with the letter.", "\\nOptions:" ->
"\\nChoices:" (stripped again) + ``"<end_of_utterance>\\nAssistant:"`` + ``" Answer:"`` when the
prompt contains both "A." and "B.". The text-first user turn renders ``"User: "`` as VK writes it.

Budget: 128 new tokens (lmms-eval ``mmmu`` template); VK: 2048.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from smolvlm.evaluation.benchmarks.base import Benchmark, BuildContext, Item, Row, image, image_from_struct, text
from smolvlm.evaluation.benchmarks.prompts import PLEASE_SELECT, letter_options, mcq_text, replace_all

MAX_IMAGES = 7
IMAGE_COLUMNS = tuple(f"image_{k}" for k in range(1, MAX_IMAGES + 1))
MMMU_REPLACE = (("Question:", ""), (PLEASE_SELECT, "Answer with the letter."), ("\nOptions:", "\nChoices:"))


def parse_options(value: Any) -> list[str]:
    """The ``options`` cell: a stringified Python list (``"['1', '2']"``) or a list."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError):
            raise ValueError(f"MMMU options {value[:80]!r} is not a list") from None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"MMMU options is {type(value).__name__}, not a list")
    return [str(o) for o in value]


def is_multiple_choice(row: Row) -> bool:
    return str(row.get("question_type", "")).strip() == "multiple-choice"


def options_of(row: Row) -> dict[str, str]:
    return letter_options(parse_options(row.get("options"))) if is_multiple_choice(row) else {}


def reference(row: Row) -> dict:
    return {"question_type": "multiple-choice" if is_multiple_choice(row) else "open",
            "answer": str(row["answer"]), "options": options_of(row)}


def subject(row: Row) -> str | None:
    """``validation_Art_Theory_3`` -> ``Art_Theory``."""
    m = re.match(r"^[a-z]+_(.+)_\d+$", str(row.get("id", "")))
    return m.group(1) if m else None


def segments(prompt: str, n_images: int) -> list[tuple[str, Any]]:
    """VK ``split_MMMU`` on the prompt text: ``("text", str)`` / ``("image", k)`` items in order,
    ``k`` indexing the row's images (0-based); text without an ``<image `` marker: all the images
    first, then the text."""
    parts = prompt.split("<image ")
    if len(parts) == 1:
        return [("image", k) for k in range(n_images)] + [("text", prompt)]
    segs: list[tuple[str, Any]] = [("text", parts[0])]
    for seg in parts[1:]:
        if len(seg) < 2 or not seg[0].isdigit() or seg[1] != ">":
            raise ValueError(f"MMMU question: malformed image marker '<image {seg[:3]}'")
        segs.append(("image", int(seg[0]) - 1))
        segs.append(("text", seg[2:]))
    return segs


def build(row: Row, ctx: BuildContext) -> Item:
    rid = str(row["id"])
    options = options_of(row)
    prompt = mcq_text(str(row["question"]), options)
    # VK's TSV holds the row's images as one list (image_1, image_2, ... that are present);
    # "<image k>" is the k-th of that list.
    cells = [(c, row[c]) for c in IMAGE_COLUMNS if row.get(c) is not None]
    segs = segments(prompt, len(cells))
    decoded: dict[int, Any] = {}

    def img(k: int) -> Any:
        if k not in decoded:
            if k >= len(cells):
                raise ValueError(f"MMMU {rid}: the text refers to <image {k + 1}>, which the row does not have")
            decoded[k] = image_from_struct(cells[k][1], f"MMMU {rid} {cells[k][0]}")
        return decoded[k]

    image_segs = [k for kind, k in segs if kind == "image"]
    content: list[dict[str, Any]] = []
    head = "Question: "
    for c, k in enumerate(image_segs, 1):  # "<image c>:<image>\n" per image message
        content += [text(head + f"<image {c}>:"), image(img(k))]
        head = "\n"
    body, c = "", 0
    for kind, value in segs:
        if kind == "image":
            c += 1
            body += f" <image {c}> "
        else:
            body += replace_all(value.strip(), MMMU_REPLACE).strip()
    content.append(text(head + body))
    full = "Question: " + body  # what VK's "A." / "B." test sees, less fixed text without either
    return Item(rid, [{"role": "user", "content": content}],
                answer_prefix=" Answer:" if "A." in full and "B." in full else "")


BENCHMARK = Benchmark(
    name="mmmu",
    hub_id="MMMU/MMMU",
    hub_config=None,
    split="validation",
    media="image",
    text_columns=("id", "question_type", "answer", "options"),
    row_id=lambda row, index: str(row["id"]),
    reference=reference,
    category=subject,
    build=build,
    max_new_tokens=128,
    published={"SmolVLM2-2.2B-Instruct": 42.0, "SmolVLM-Instruct": 38.3},
    notes=("Prompt is VLMEvalKit's SmolVLM build_prompt_mmmu over MMMUDataset.build_prompt, byte for byte; "
           "answer budget 128 tokens (lmms-eval) where VLMEvalKit allows 2048. Published: SmolVLM2 model card "
           "(MMMU val); the SmolVLM blog (2024-11) gives 38.8 for SmolVLM 2B."),
)
