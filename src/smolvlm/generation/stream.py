"""``smolvlm.stream`` and ``smolvlm.answer``: a chat or a prompt in, the model's answer as text out.

The processor builds the inputs (``processor.chat_inputs``: chat template, images, videos; user
text is plain text there, so typed special tokens cannot fake turns); ``generate.generate_tokens``
produces the ids; ``text_stream.TextStream`` turns them into printable pieces and applies stop
strings. Model and processor are duck-typed: this module imports neither ``model/`` nor
``processing/``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from smolvlm.generation.config import resolve_settings
from smolvlm.generation.generate import generate_tokens
from smolvlm.generation.pixels import compact_pixel_inputs, pixel_dtype
from smolvlm.generation.text_stream import TextStream


@dataclass
class StreamStats:
    """Filled in by ``stream`` for callers that report timings (the CLI's ``--json``)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    text: str = ""
    stopped_by: str = ""  # "eos", "stop_string" or "length"

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: tokens after the first over the time after the first token."""
        decode_s = self.total_s - self.time_to_first_token_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


def stream(
    model: Any,
    processor: Any,
    messages_or_prompt: str | list[dict[str, Any]],
    images: Sequence[Any] | None = None,
    *,
    stats: StreamStats | None = None,
    feature_cache: Any = None,
    allow_special_tokens: bool = False,
    **gen_kwargs: Any,
) -> Iterator[str]:
    """Yield the model's answer as text pieces, as they are generated.

    ``messages_or_prompt``: a chat (list of ``{"role", "content": [items]}``) rendered with the
    checkpoint's chat template, or a string taken as one user turn with ``images`` placed before
    the text (the usual "<image>question" layout). Images inside messages come from items
    ``{"type": "image", "image": PIL.Image | path}`` (or ``"path"``, ``"url"``, ``"base64"`` keys),
    videos from ``{"type": "video", "video"|"path": ...}``. Special-token strings in the text
    (``<end_of_utterance>``, ``<image>``...) are plain text unless ``allow_special_tokens``.
    ``gen_kwargs`` are those of ``generate_ids`` (max_new_tokens, do_sample, stop_strings, ...).
    """
    stats = stats if stats is not None else StreamStats()
    t0 = time.perf_counter()
    # pixels built in the model's dtype (no float32 batch); compacting then only converts what was not
    inputs = compact_pixel_inputs(model, processor.chat_inputs(messages_or_prompt, images,
                                                                allow_special_tokens=allow_special_tokens,
                                                                pixel_dtype=pixel_dtype(model)))
    stats.prompt_tokens = int(inputs["input_ids"].shape[1])
    settings = resolve_settings(model, stats.prompt_tokens, **gen_kwargs)
    text_stream = TextStream(processor.tokenizer, settings.stop_strings)
    # stop strings are handled here at the text level; the core only needs eos/length
    gen = generate_tokens(
        model, **inputs, feature_cache=feature_cache, settings=dataclasses.replace(settings, stop_strings=())
    )
    del inputs  # the pixels go once the images are encoded, before the prompt's forward
    pieces: list[str] = []
    stats.stopped_by = "length"
    try:
        for tok in gen:
            if stats.new_tokens == 0:
                stats.time_to_first_token_s = time.perf_counter() - t0
            stats.new_tokens += 1
            tid = int(tok[0])
            piece, stopped = text_stream.push(tid)
            if piece:
                pieces.append(piece)
                yield piece
            if stopped:
                stats.stopped_by = "stop_string"
                break
            if tid in settings.eos_token_ids:
                stats.stopped_by = "eos"
        if stats.stopped_by != "stop_string":
            tail = text_stream.flush()
            if tail:
                pieces.append(tail)
                yield tail
    finally:
        gen.close()
        stats.total_s = time.perf_counter() - t0
        stats.text = "".join(pieces)


def answer(model: Any, processor: Any, messages_or_prompt: str | list[dict[str, Any]],
           images: Sequence[Any] | None = None, **kwargs: Any) -> str:
    """The whole answer as one string: ``"".join(stream(...))`` (same arguments)."""
    return "".join(stream(model, processor, messages_or_prompt, images, **kwargs))
