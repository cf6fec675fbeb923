"""What callers of the engine (``generation/engine.py``) hand in and get back.

A ``Request`` is one conversation's processor outputs plus its sampling settings. ``submit``
returns a ``RequestHandle``: a thread-safe stream of ``TokenEvent`` s ending in one
``FinishEvent``, readable by blocking iteration, ``get(timeout)``, or ``async for`` (an HTTP
handler on an asyncio loop). Closing either iterator early, or ``cancel()``, stops the
generation and frees its KV row at the next engine step: a client that disconnects costs
nothing after that.

Text is optional and the caller's: a ``TextSink`` (``push(token_id) -> (text, stopped)``,
``flush() -> text``, which is what ``TextStream`` offers) runs on the engine thread, so its
pieces arrive with the tokens and a stop string ends the request at once.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Mapping, Protocol

import torch

from smolvlm.generation.config import GenerationSettings, resolve_settings
from smolvlm.generation.pixels import compact_pixel_inputs

FinishReason = Literal["stop", "length", "cancelled", "error"]
INPUT_KEYS = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")


class EngineBusy(RuntimeError):
    """Every KV row is busy and the waiting queue is full: retry later (HTTP 429 / 503)."""


class EngineClosed(RuntimeError):
    """The engine was stopped; it takes no new requests."""


class RequestTooLong(ValueError):
    """prompt + max_new_tokens can never fit one KV row (HTTP 400): waiting would not help."""


class TextSink(Protocol):
    """Per-request detokenizer + stop strings (``TextStream`` has this shape)."""

    def push(self, token_id: int) -> tuple[str, bool]: ...

    def flush(self) -> str: ...


@dataclass
class Request:
    """One conversation: processor outputs with batch size 1, and how to decode it.

    ``settings`` None: ``resolve_settings(model, prompt_len)`` (the checkpoint's defaults).
    Stop strings need a ``text`` sink (they are found in text, not ids).
    """

    input_ids: torch.Tensor  # (1, T) or (T,)
    attention_mask: torch.Tensor | None = None  # (1, T); left padding is dropped
    pixel_values: torch.Tensor | None = None  # (1, N, 3, H, W)
    pixel_attention_mask: torch.Tensor | None = None  # (1, N, H, W)
    settings: GenerationSettings | None = None
    text: TextSink | None = None
    request_id: str | None = None

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any], **kwargs: Any) -> "Request":
        """From a processor output (``processor.chat_inputs(...)``); other keys are ignored."""
        return cls(**{k: inputs[k] for k in INPUT_KEYS if inputs.get(k) is not None}, **kwargs)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    index: int  # 0 for the first generated token
    text: str = ""  # the text sink's new piece ("" without a sink)


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every request. ``reason``: "stop" (an eos id or a stop string),
    "length" (max_new_tokens), "cancelled" (``cancel()``, a closed iterator, engine stop) or
    "error" (``error`` says why; the engine itself keeps running)."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float | None  # from submit; None if no token came
    total_s: float  # from submit to finish
    text: str = ""  # the text sink's flushed tail (held-back text), if any
    error: str | None = None


Event = TokenEvent | FinishEvent


@dataclass
class Completion:
    """A whole answer, as ``RequestHandle.result()`` collects it."""

    token_ids: list[int]
    text: str
    finish: FinishEvent


@dataclass
class RequestHandle:
    """The caller's side of one request. Read it one way only (iterate, ``get``, ``result`` or ``async for``)."""

    request_id: str
    prompt_tokens: int
    _wake: Callable[[], None] = field(repr=False)
    _queue: "queue.Queue[Event]" = field(default_factory=queue.Queue, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _listener: Callable[[Event], None] | None = field(default=None, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    finish: FinishEvent | None = None

    # -- caller side ----------------------------------------------------------------------
    def cancel(self) -> None:
        """Stop this request; its row is freed at the next engine step (a no-op once finished)."""
        if not self._done.is_set():
            self._cancel.set()
            self._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request finished; False on timeout."""
        return self._done.wait(timeout)

    def get(self, timeout: float | None = None) -> Event:
        """The next event; raises ``queue.Empty`` after ``timeout`` seconds."""
        return self._queue.get(timeout=timeout)

    def __iter__(self) -> Iterator[Event]:
        finished = False
        try:
            while not finished:
                ev = self._queue.get()
                finished = isinstance(ev, FinishEvent)
                yield ev
        finally:
            if not finished:  # the consumer stopped listening: stop generating
                self.cancel()

    def result(self, timeout: float | None = None) -> Completion:
        """Block for the whole answer; ``TimeoutError`` after ``timeout`` seconds (the request keeps running)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        ids, pieces = [], []
        for ev in self:
            if isinstance(ev, TokenEvent):
                ids.append(ev.token_id)
                pieces.append(ev.text)
            else:
                pieces.append(ev.text)
                return Completion(ids, "".join(pieces), ev)
        raise AssertionError("unreachable: a handle's events end with a FinishEvent")

    async def __aiter__(self) -> AsyncIterator[Event]:
        """Events on the running asyncio loop, without a thread per request. If the consumer goes
        away (the client disconnected and the task was cancelled), the request is cancelled; after
        an early ``break``, close the iterator (``contextlib.aclosing``) to cancel at once rather
        than when the loop finalizes it."""
        loop = asyncio.get_running_loop()
        aq: asyncio.Queue[Event] = asyncio.Queue()
        with self._lock:  # move what already arrived, then have the engine call into this loop
            while not self._queue.empty():
                aq.put_nowait(self._queue.get_nowait())
            self._listener = lambda ev: loop.call_soon_threadsafe(aq.put_nowait, ev)
        finished = False
        try:
            while not finished:
                ev = await aq.get()
                finished = isinstance(ev, FinishEvent)
                yield ev
        finally:
            if not finished:
                self.cancel()

    # -- engine side ----------------------------------------------------------------------
    def _emit(self, ev: Event) -> None:
        with self._lock:
            if self._listener is None:
                self._queue.put(ev)
            else:
                try:
                    self._listener(ev)
                except RuntimeError:  # the consumer's event loop is closed: nobody listens any more
                    self._cancel.set()
        if isinstance(ev, FinishEvent):
            self.finish = ev
            self._done.set()


@dataclass
class PreparedRequest:
    """A validated request on the model's device, waiting for (or holding) an engine row."""

    handle: RequestHandle
    input_ids: torch.Tensor  # (1, T), no padding
    pixel_values: torch.Tensor | None
    pixel_attention_mask: torch.Tensor | None
    settings: GenerationSettings
    text: TextSink | None
    t_submit: float
    # the engine's: the image features once encoded (the pixels then let go; the features in turn once the
    # prompt is in the cache), and how many prompt tokens a prompt going in a chunk per step has written
    image_features: torch.Tensor | None = None
    prefilled: int = 0


def prepare_request(request: Request, model: Any, max_context: int, device: torch.device, request_id: str,
                    wake: Callable[[], None]) -> PreparedRequest:
    """Validate one request for an engine whose rows hold ``max_context`` slots; errors name the fix."""
    ids = request.input_ids
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be an integer tensor of shape (1, seq_len)")
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"a request is one conversation: input_ids (1, seq_len > 0), got {tuple(ids.shape)}")
    if request.attention_mask is not None:
        ids = _strip_left_padding(ids, request.attention_mask)
    pv, pm = request.pixel_values, request.pixel_attention_mask
    if pv is not None and (pv.dim() != 5 or pv.shape[0] != 1):
        raise ValueError(f"pixel_values must be (1, num_images, 3, H, W) for one request, got {tuple(pv.shape)}")
    t = ids.shape[1]
    s = request.settings if request.settings is not None else resolve_settings(model, t)
    if s.stop_strings and request.text is None:
        raise ValueError("stop_strings need a text sink (Request.text = TextStream(tokenizer, stop_strings))")
    if t + s.max_new_tokens > max_context:
        raise RequestTooLong(f"prompt of {t} tokens + max_new_tokens={s.max_new_tokens} = {t + s.max_new_tokens} "
                             f"exceeds this engine's context of {max_context} tokens per request; shorten "
                             f"the prompt (fewer/smaller images) or lower max_new_tokens")
    pixels = compact_pixel_inputs(model, {"pixel_values": pv, "pixel_attention_mask": pm})  # bit-identical, smaller
    move = (lambda x: None if x is None else x.to(device))
    return PreparedRequest(RequestHandle(request_id, t, _wake=wake), ids.long().to(device),
                           move(pixels["pixel_values"]), move(pixels["pixel_attention_mask"]), s, request.text,
                           time.perf_counter())


def _strip_left_padding(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Keep the real tokens of a left-padded (1, T) row (generation gives them positions 0..n-1 either way)."""
    mask = mask[None] if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    n = int(mask.sum())
    if n == 0 or not bool(mask[0, -n:].all()):
        raise ValueError("attention_mask must be ones after optional left padding (one real, left-padded prompt)")
    return ids[:, -n:]
