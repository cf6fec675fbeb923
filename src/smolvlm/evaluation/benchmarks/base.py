"""What a benchmark is: how to read its rows, ask its questions and score the answers.

A benchmark module (``benchmarks/<name>.py``) defines ``BENCHMARK = Benchmark(...)``. The runner
(``evaluation/bench_runner.py``) only talks to that object:

* ``row_id(row, index)``: the dataset's own question id (ChartQA has none: the row index);
  prediction files are keyed by it.
* ``reference(row)``: a JSON-able dict with what the scorer needs (gold answers, options, ...);
  read from ``text_columns`` only, so scoring-only mode never decodes an image.
* ``category(row)``: the category the paper breaks the score down by, or None.
* ``build(row, ctx)``: the ``Item`` to generate -- chat messages with the media inside and an
  optional assistant prefix (VLMEvalKit's SmolVLM wrapper ends multiple-choice prompts with
  ``"Assistant: Answer:"``).
* ``score``: ``scoring.SCORERS[name]``, ``(prediction, reference) -> [0, 1]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class BuildContext:
    """What ``build`` may need besides the row: the folder of the benchmark's videos (``--media``)."""

    media: Path | None = None


@dataclass(frozen=True)
class Item:
    """One question, ready to render with the checkpoint's chat template.

    ``messages``: ``{"role", "content"}`` dicts; image items carry the decoded image
    (``{"type": "image", "image": PIL.Image}``), video items the file (``{"type": "video", "path": str}``).
    ``answer_prefix``: text appended after the generation prompt (``"Assistant:"``).
    """

    id: str
    messages: list[dict[str, Any]]
    answer_prefix: str = ""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: data location, prompt, scoring (see the module docstring)."""

    name: str  # the ``--task`` name
    hub_id: str  # dataset repo on the hub (``--data`` may name it where there is internet)
    hub_config: str | None  # the subset folder inside the repo (DocVQA: "DocVQA"), None for all
    split: str | None  # default ``--split``; None: a layout whose files are not named by split
    media: str  # "image" or "video"
    text_columns: tuple[str, ...]  # columns that id, reference and category read (no image bytes)
    row_id: Callable[[Row, int], str]
    reference: Callable[[Row], dict[str, Any]]
    category: Callable[[Row], str | None]
    build: Callable[[Row, BuildContext], Item]
    max_new_tokens: int  # default answer budget (generation also stops at <end_of_utterance>)
    published: dict[str, float] = field(default_factory=dict)  # checkpoint name -> published score (0-100)
    notes: str = ""  # how our run differs from the reference's, shown in the results
    overall: str = "micro"  # "micro": mean over questions; "macro": mean of the category scores
    keep_file: Callable[[Path], bool] | None = None  # which of the split's files hold this benchmark's rows

    @property
    def score(self) -> Callable[[str, dict[str, Any]], float]:
        from smolvlm.evaluation.scoring import SCORERS

        return SCORERS[self.name]

    @property
    def metric(self) -> str:
        from smolvlm.evaluation.scoring import METRIC_NAMES

        return METRIC_NAMES[self.name]


def image_from_struct(value: Any, what: str = "image"):
    """A parquet image cell (the ``datasets`` Image feature: ``{"bytes", "path"}``, or raw bytes)
    -> PIL RGB image, decoded with the processor's loader (its size and corruption checks)."""
    from smolvlm.processing.image_io import load_image

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            return load_image(value["path"])
        if data is None:
            raise ValueError(f"{what} cell has neither bytes nor a path")
        return load_image(data)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return load_image(bytes(value))
    raise ValueError(f"{what} cell is {type(value).__name__}, not an image struct {{bytes, path}}")


def user_turn(*parts: dict[str, Any], system: str | None = None) -> list[dict[str, Any]]:
    """Messages for one question: an optional system turn, then one user turn with ``parts``."""
    msgs: list[dict[str, Any]] = []
    if system is not None:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system}]})
    msgs.append({"role": "user", "content": list(parts)})
    return msgs


def text(s: str) -> dict[str, Any]:
    return {"type": "text", "text": s}


def image(img: Any) -> dict[str, Any]:
    return {"type": "image", "image": img}


def video(path: str | Path) -> dict[str, Any]:
    return {"type": "video", "path": str(path)}
