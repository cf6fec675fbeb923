"""Response bodies in OpenAI's shapes: ``chat.completion``, ``chat.completion.chunk``, ``list`` of models.

Plain dicts, built in one place so that the JSON and the SSE paths cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

FINISH_REASONS = {"stop": "stop", "length": "length"}  # engine reason -> OpenAI finish_reason


@dataclass(frozen=True)
class Ids:
    """What every chunk of one completion repeats."""

    id: str
    created: int
    model: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(ids: Ids, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(ids: Ids, delta: dict[str, Any] | None, finish_reason: str | None = None, *, include_usage: bool = False,
          usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None is the usage-only chunk (``choices`` empty).
    With ``include_usage`` every chunk carries ``"usage": null`` except that last one, as OpenAI sends."""
    out: dict[str, Any] = {"id": ids.id, "object": "chat.completion.chunk", "created": ids.created, "model": ids.model,
                           "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                                 "finish_reason": finish_reason}]}
    if include_usage:
        out["usage"] = usage_
    return out


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` and a blank line (``[DONE]`` as is)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def model_card(model_id: str, created: int, max_context: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "smolvlm",
            "max_model_len": max_context}


def model_list(model_id: str, created: int, max_context: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(model_id, created, max_context)]}
