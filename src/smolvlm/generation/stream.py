"""Token ids -> text pieces: incremental detokenization, stop strings, and ``smolvlm.stream``.

Reference behaviour: the final text equals ``tokenizer.decode(new_ids, skip_special_tokens=True)``
(SPEC 3.6) cut before the first stop string. Pieces are safe to print as they come: a piece
never ends inside a multi-byte character (byte-level BPE tokens can split one), and text that
could still become a stop string is held back until it can no longer match.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from smolvlm.generation.config import resolve_settings

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals ``decode(all ids)``.

    Decodes a short window ``ids[prefix:]`` and subtracts the already-emitted window text
    ``ids[prefix:read]`` (the scheme of text-generation-inference), so each step costs O(window),
    and decoders that treat the first token specially still give consistent deltas. While the
    decoded tail ends in U+FFFD the bytes of a character are incomplete: hold everything back.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # ids[:read] are already turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete or invalid byte sequence at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""  # nothing printable yet (special token skipped, or a partial character)
        self._prefix, self._read = self._read, len(self.ids)
        return new_text[len(prefix_text) :]


class StopStringFilter:
    """Passes text through until a stop string appears; never emits any part of a stop string.

    ``push(text) -> (safe_text, stopped)``. Text that ends with a prefix of some stop string is
    held back until more text decides it; on a match, everything from the earliest match start
    on is dropped and ``stopped`` is True.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        if any(not s for s in stop_strings):
            raise ValueError("stop strings must be non-empty")
        self.stop_strings = tuple(stop_strings)
        self._buf = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._buf + text
        hits = [i for i in (buf.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self._buf, self.stopped = "", True
            return buf[: min(hits)], True
        hold = self._partial_suffix_len(buf)
        self._buf = buf[len(buf) - hold :]
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """End of generation: held text was not a stop string after all."""
        out, self._buf = ("" if self.stopped else self._buf), ""
        return out

    def _partial_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best


class TextStream:
    """Detokenizer + stop-string filter for one sequence: ``push(id) -> (text, stopped)``."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.stop = StopStringFilter(stop_strings)

    def push(self, token_id: int) -> tuple[str, bool]:
        return self.stop.push(self.detok.push(token_id))

    def flush(self) -> str:
        text, stopped = self.stop.push(self.detok.flush())
        return text if stopped else text + self.stop.flush()


def apply_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """Whole-text version of the filter: ``text`` cut before the earliest stop string."""
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    return text[: min(hits)] if hits else text


IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")  # transformers' order of precedence


def check_image_source(obj: Any) -> Any:
    """Fail early (before a slow model load) on a local image path that does not exist.

    Sources go to the processor unchanged: PIL images, arrays, bytes, local paths, ``http(s)://``
    URLs and ``data:image/...;base64,`` URIs are all the processor's to load.
    """
    if isinstance(obj, (str, Path)):
        s = str(obj)
        if not s.startswith(("http://", "https://", "data:")) and not Path(s).expanduser().is_file():
            raise FileNotFoundError(f"image file not found: {s}")
        return str(Path(s).expanduser()) if not s.startswith(("http://", "https://", "data:")) else s
    return obj


def _content_items(message: dict[str, Any]) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, str):
        # The checkpoint's template renders string content as nothing (SPEC 3.4); make it an item.
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"message content must be a string or a list of items, got {type(content).__name__}")
    return content


def normalize_messages(
    messages_or_prompt: str | list[dict[str, Any]], images: Sequence[Any] | None = None
) -> tuple[list[dict[str, Any]], list[Any], list[Any]]:
    """-> (messages with list content, images in order of appearance, videos in order of appearance)."""
    if isinstance(messages_or_prompt, str):
        items = [{"type": "image"} for _ in images or ()] + [{"type": "text", "text": messages_or_prompt}]
        messages = [{"role": "user", "content": items}]
        pending = list(images or ())
    else:
        if images:
            raise ValueError("pass images inside the messages ({'type': 'image', 'image': ...}), not as images=")
        messages = [{**m, "content": _content_items(m)} for m in messages_or_prompt]
        pending = []
    found: list[Any] = []
    videos: list[Any] = []
    for m in messages:
        for item in m["content"]:
            kind = item.get("type")
            if kind == "image":
                key = next((k for k in IMAGE_SOURCE_KEYS if k in item), None)
                src = item[key] if key else (pending.pop(0) if pending else None)
                if key == "base64" and isinstance(src, str) and not src.startswith("data:image/"):
                    src = "data:image/unknown;base64," + src
                found.append(src)
            elif kind == "video":
                videos.append(item.get("video", item.get("path", item.get("url"))))
    if any(x is None for x in found):
        raise ValueError("an image item has no image (give it an 'image' or 'path' key)")
    return messages, [check_image_source(x) for x in found], videos


def build_inputs(
    processor: Any, messages_or_prompt: str | list[dict[str, Any]], images: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Chat template + processor -> model inputs for one conversation (batch of 1)."""
    messages, imgs, videos = normalize_messages(messages_or_prompt, images)
    if videos:
        return _build_video_inputs(processor, messages, imgs, videos)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = processor(text=[text], images=[imgs] if imgs else None, return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in out}


def _build_video_inputs(processor: Any, messages: list[dict[str, Any]], imgs: list[Any], videos: list[Any]) -> dict[str, Any]:
    """Video items need a processor whose ``__call__`` takes ``videos=`` (one list per prompt)."""
    try:
        accepts_videos = "videos" in inspect.signature(processor.__call__).parameters
    except (TypeError, ValueError):
        accepts_videos = False
    if not accepts_videos:
        raise ValueError("video input is not supported by this processor yet")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    out = processor(text=[text], images=[imgs] if imgs else None, videos=[videos], return_tensors="pt")
    return {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask") if k in out}


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
    **gen_kwargs: Any,
) -> Iterator[str]:
    """Yield the model's answer as text pieces, as they are generated.

    ``messages_or_prompt``: a chat (list of ``{"role", "content": [items]}``) rendered with the
    checkpoint's chat template, or a string taken as one user turn with ``images`` placed before
    the text (the usual "<image>question" layout). Images inside messages come from items
    ``{"type": "image", "image": PIL.Image | path}`` (or ``"path"``, ``"url"``, ``"base64"`` keys).
    ``gen_kwargs`` are those of ``generate_ids`` (max_new_tokens, do_sample, stop_strings, ...).
    """
    from smolvlm.generation.generate import generate_tokens

    stats = stats if stats is not None else StreamStats()
    t0 = time.perf_counter()
    inputs = build_inputs(processor, messages_or_prompt, images)
    stats.prompt_tokens = int(inputs["input_ids"].shape[1])
    settings = resolve_settings(model, stats.prompt_tokens, **gen_kwargs)
    text_stream = TextStream(processor.tokenizer, settings.stop_strings)
    # stop strings are handled here at the text level; the core only needs eos/length
    gen = generate_tokens(
        model, **inputs, feature_cache=feature_cache, settings=dataclasses.replace(settings, stop_strings=())
    )
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
