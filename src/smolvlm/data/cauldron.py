"""the_cauldron's sample layout and its chat messages.

HuggingFaceM4/the_cauldron (what SmolVLM was fine-tuned on) stores a sample as::

    {"images": [PIL.Image, ...], "texts": [{"user": q, "assistant": a}, ...], ...}

The synthetic generator (``smolvlm.synth``) writes this layout and users' own datasets are read in
it. Training (``training/data.py``) and evaluation (``evaluation/tasks/synth.py``) both turn a
sample into chat messages here, so an evaluated prompt is exactly the training prompt.
"""

from __future__ import annotations

from typing import Any

Message = dict[str, Any]


class DataError(ValueError):
    """A sample that cannot be turned into model inputs (not the_cauldron layout, bad labels...)."""


def sample_to_messages(sample: dict[str, Any], system_prompt: str | None = None) -> list[Message]:
    """the_cauldron sample -> chat messages. All images open the first user turn, as the_cauldron and
    SmolVLM fine-tuning do (SPEC 7); an optional system prompt leads."""
    texts = sample.get("texts")
    if not texts:
        raise DataError(f"sample {sample.get('id', '?')!r} has no 'texts' turns")
    n_images = len(sample.get("images") or [])
    msgs: list[Message] = []
    if system_prompt:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for i, turn in enumerate(texts):
        if "user" not in turn or "assistant" not in turn:
            raise DataError(f"sample {sample.get('id', '?')!r} turn {i} needs 'user' and 'assistant', got {sorted(turn)}")
        content = [{"type": "image"} for _ in range(n_images if i == 0 else 0)]
        content.append({"type": "text", "text": turn["user"]})
        msgs.append({"role": "user", "content": content})
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": turn["assistant"]}]})
    return msgs
