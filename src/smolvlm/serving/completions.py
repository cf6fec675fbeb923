"""One chat completion through the engine: inputs, submission, then a JSON body or SSE events.

Both paths read the same ``RequestHandle`` events through the same ``AnswerText``, so the streamed
text equals the non-streamed text for the same greedy request. The answer loses its leading
whitespace (the model's first token after the template's "Assistant:" carries a space; the
template adds it back when the answer returns as an assistant message), as the CLI prints it.

A client that goes away stops its generation: the SSE generator is closed (Starlette cancels it
when the connection drops) and a non-streamed request watches for ``http.disconnect``; either way
``handle.cancel()`` frees the KV row at the next engine step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from smolvlm.generation.config import resolve_settings
from smolvlm.generation.requests import (EngineBusy, EngineClosed, FinishEvent, Request, RequestHandle,
                                         RequestTooLong)
from smolvlm.generation.text_stream import AnswerText, TextStream
from smolvlm.serving import schemas
from smolvlm.serving.errors import APIError, bad_request, context_too_long, error_body
from smolvlm.serving.media import MediaLimits, load_media
from smolvlm.serving.metrics import ServerMetrics
from smolvlm.serving.parse import ChatRequest, generation_kwargs

log = logging.getLogger("smolvlm.serving")


def chat_messages(req: ChatRequest, media: dict[tuple[str, str], Any]) -> list[dict[str, Any]]:
    """Parsed messages + decoded media -> the processor's chat format (``processing/messages.py``)."""
    out = []
    for m in req.messages:
        content = [{"type": "text", "text": p} if isinstance(p, str) else {"type": p.kind, p.kind: media[p.kind, p.url]}
                   for p in m.parts]
        out.append({"role": m.role, "content": content})
    return out


def build_inputs(req: ChatRequest, processor: Any, limits: MediaLimits, max_context: int,
                 pixel_dtype: Any = None) -> Any:
    """Fetch and decode the media, render the chat template, tokenize (blocking: run in a worker thread).
    ``pixel_dtype``: the model's (``generation.pixels.pixel_dtype``), so the float32 pixel batch never exists."""
    refs = req.media
    if len(refs) * processor.image_seq_len >= max_context:  # each image or video frame costs image_seq_len tokens
        raise context_too_long(f"{len(refs)} images/videos need at least {len(refs) * processor.image_seq_len} "
                               f"tokens, more than this model's context of {max_context} tokens")
    media = load_media(refs, limits, processor)
    try:
        return processor.chat_inputs(chat_messages(req, media), pixel_dtype=pixel_dtype)
    except ValueError as e:  # ChatError, PromptError, ImageError, VideoError: the messages do not fit together
        raise bad_request(" ".join(str(e).split()), "messages") from None


def submit(engine: Any, tokenizer: Any, inputs: Any, req: ChatRequest) -> RequestHandle:
    """Settings, the prompt + max_tokens budget, then ``engine.submit``; errors as ``APIError``."""
    n = int(inputs["input_ids"].shape[1])
    s = req.sampling
    if n >= engine.max_context or (s.max_tokens is not None and n + s.max_tokens > engine.max_context):
        asked = f" + max_tokens {s.max_tokens}" if s.max_tokens is not None else ""
        raise context_too_long(f"the prompt is {n} tokens{asked}; this model's context holds {engine.max_context} "
                               f"tokens per request: send fewer or smaller images, a shorter history, or a lower "
                               f"max_tokens", "max_tokens" if s.max_tokens is not None and n < engine.max_context
                               else "messages")
    try:
        settings = resolve_settings(engine.model, n, **generation_kwargs(s, n, engine.max_context))
        request = Request.from_inputs(inputs, settings=settings, text=TextStream(tokenizer, s.stop),
                                      request_id=f"chatcmpl-{uuid.uuid4().hex}")
        return engine.submit(request)
    except RequestTooLong as e:
        raise context_too_long(str(e)) from None
    except EngineBusy as e:
        raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="engine_busy",
                       headers={"Retry-After": "1"}) from None
    except EngineClosed:
        raise APIError(503, "the server is shutting down", type="server_error", code="unavailable") from None
    except ValueError as e:
        raise bad_request(str(e)) from None


@dataclass
class Running:
    """A submitted request and what its responses repeat."""

    handle: RequestHandle
    ids: schemas.Ids
    include_usage: bool
    metrics: ServerMetrics

    @classmethod
    def start(cls, handle: RequestHandle, model_id: str, include_usage: bool, metrics: ServerMetrics) -> "Running":
        metrics.submitted(handle.prompt_tokens)
        return cls(handle, schemas.Ids(handle.request_id, int(time.time()), model_id), include_usage, metrics)

    def finished(self, ev: FinishEvent) -> str | None:
        """OpenAI's finish_reason, or None when the request failed (logged, counted by the engine)."""
        if ev.reason in schemas.FINISH_REASONS:
            self.metrics.answered(ev.completion_tokens, ev.time_to_first_token_s, ev.total_s)
            return schemas.FINISH_REASONS[ev.reason]
        log.warning("request %s ended %s: %s", self.handle.request_id, ev.reason, ev.error)
        return None


def _failure(ev: FinishEvent) -> APIError:
    if ev.reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", type="server_error",
                        code="unavailable")
    return APIError(500, "the model failed on this request (see the server log)", type="server_error",
                    code="generation_failed")


async def sse_events(run: Running) -> AsyncIterator[str]:
    """``data: {chunk}`` events: the role, the text pieces, the finish reason, usage if asked, ``[DONE]``."""
    ids, usage_on, text = run.ids, run.include_usage, AnswerText()
    try:
        yield schemas.sse(schemas.chunk(ids, {"role": "assistant", "content": ""}, include_usage=usage_on))
        async with contextlib.aclosing(run.handle.__aiter__()) as events:
            async for ev in events:
                piece = text(ev.text)
                if piece:
                    yield schemas.sse(schemas.chunk(ids, {"content": piece}, include_usage=usage_on))
                if not isinstance(ev, FinishEvent):
                    continue
                reason = run.finished(ev)
                if reason is None:
                    err = _failure(ev)
                    yield schemas.sse(error_body(err.message, err.type, None, err.code))
                    break
                yield schemas.sse(schemas.chunk(ids, {}, reason, include_usage=usage_on))
                if usage_on:
                    yield schemas.sse(schemas.chunk(ids, None, include_usage=True,
                                                    usage_=schemas.usage(ev.prompt_tokens, ev.completion_tokens)))
        yield schemas.sse("[DONE]")
    finally:
        run.handle.cancel()  # a no-op once finished; otherwise the client went away


async def _answer(run: Running) -> dict[str, Any]:
    text, pieces = AnswerText(), []
    async with contextlib.aclosing(run.handle.__aiter__()) as events:
        async for ev in events:
            pieces.append(text(ev.text))
            if isinstance(ev, FinishEvent):
                reason = run.finished(ev)
                if reason is None:
                    raise _failure(ev)
                return schemas.completion(run.ids, "".join(pieces), reason, ev.prompt_tokens, ev.completion_tokens)
    raise AssertionError("unreachable: a handle's events end with a FinishEvent")


async def _disconnected(receive: Any) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def json_answer(run: Running, receive: Any) -> dict[str, Any] | None:
    """The whole ``chat.completion``; None if the client disconnected first (its generation is cancelled)."""
    answer = asyncio.ensure_future(_answer(run))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not answer.done() and gone.exception() is not None:  # could not watch: just answer
            await asyncio.wait({answer})
        return answer.result() if answer.done() else None
    finally:
        for task in (answer, gone):
            task.cancel()
        run.handle.cancel()
