"""A ``/v1/chat/completions`` body (already JSON-decoded) -> ``ChatRequest``, or an ``APIError``.

Pure: no I/O and no model. Media stay URLs here (``MediaRef``); ``media.py`` fetches and decodes
them. Every rejection names the field as OpenAI does (``param``: ``messages[1].content[0].image_url.url``).

What is accepted (OpenAI's wire format, plus the usual extensions of vLLM / llama-server):

* ``messages``: roles system, developer (read as system), user, assistant; content a string or a
  list of parts ``text``, ``image_url`` (``{"url": ...}`` or the URL string) and ``video_url``
  (the same; user messages only). Tool and function messages, audio and file parts are refused.
* ``model``: must be the served model's id when given (404 otherwise).
* ``max_completion_tokens`` (or the older ``max_tokens``): 1..max_context; absent means whatever
  the context has left after the prompt.
* ``temperature`` 0..2 (0, or absent, is greedy decoding, the checkpoint's default), ``top_p``
  (0, 1], ``seed``, ``stop`` (a string or up to 16 non-empty strings), ``n`` = 1, ``stream``,
  ``stream_options.include_usage``; extensions ``top_k``, ``min_p``, ``repetition_penalty``.
* Features we do not have (tools, logprobs, logit_bias, penalties, JSON response formats) are
  refused with a 400 when asked for, rather than silently ignored; unknown fields are ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from smolvlm.serving.errors import APIError, bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1000
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class MediaRef:
    """An image or video named by URL (``data:``, or ``http(s)`` when the server allows it)."""

    kind: Literal["image", "video"]
    url: str
    param: str  # where it was in the request, for error messages


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user or assistant
    parts: tuple[str | MediaRef, ...]  # text and media, in order


@dataclass(frozen=True)
class Sampling:
    max_tokens: int | None = None  # None: what the context has left
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return not self.temperature


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[ChatMessage, ...]
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    include_usage: bool = False

    @property
    def media(self) -> list[MediaRef]:
        return [p for m in self.messages for p in m.parts if isinstance(p, MediaRef)]


def _type_name(v: Any) -> str:
    return "null" if v is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                      list: "array", dict: "object"}.get(type(v), type(v).__name__)


def _check_text(v: str, where: str) -> str:
    """JSON may carry lone UTF-16 surrogates ("\\ud800") that no tokenizer can encode."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} holds an unpaired surrogate (\\ud800-\\udfff): not valid Unicode text",
                          where) from None
    return v


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad_request(f"'{name}' must be an integer, got {_type_name(v)}", name)
    if not lo <= v <= hi:
        raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
    return v


def _number(body: dict[str, Any], name: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"'{name}' must be a number, got {_type_name(v)}", name)
    v = float(v)
    if not math.isfinite(v) or not (lo < v if lo_open else lo <= v) or v > hi:
        raise bad_request(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def _bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad_request(f"'{name}' must be a boolean, got {_type_name(v)}", name)
    return v


def _stop(v: Any) -> tuple[str, ...]:
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request(f"'stop' must be a string or an array of strings, got {_type_name(v)}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", "stop")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop strings must be non-empty and at most {MAX_STOP_CHARS} characters", "stop")
    return tuple(dict.fromkeys(_check_text(s, "stop") for s in stops))


def _unsupported(body: dict[str, Any]) -> None:
    """Refuse what would change the answer if we ignored it; defaults and no-ops pass."""
    for name in ("tools", "functions", "logit_bias"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this server", name)
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise bad_request("'tool_choice' is not supported by this server (no tools)", "tool_choice")
    if body.get("function_call") not in (None, "none", "auto"):
        raise bad_request("'function_call' is not supported by this server", "function_call")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server", "logprobs")
    for name in ("frequency_penalty", "presence_penalty"):
        v = _number(body, name, -2.0, 2.0)
        if v:
            raise bad_request(f"'{name}' is not supported (use 'repetition_penalty')", name)
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("only the 'text' response_format is supported", "response_format")


def _url(part: dict[str, Any], key: str, where: str) -> str:
    v = part.get(key)
    if isinstance(v, dict):
        v, where = v.get("url"), f"{where}.url"
    if not isinstance(v, str) or not v:
        raise bad_request(f"{where} must be a URL string ({{'{key}': {{'url': 'data:...'}}}}), got {_type_name(v)}",
                          where)
    return v


def _parts(content: Any, role: str, where: str) -> tuple[str | MediaRef, ...]:
    if isinstance(content, str):
        return (_check_text(content, where),)
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where} must be a string or a non-empty array of content parts, got "
                          f"{_type_name(content) if content != [] else 'an empty array'}", where)
    parts: list[str | MediaRef] = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string, got {_type_name(part.get('text'))}", f"{at}.text")
            parts.append(_check_text(part["text"], f"{at}.text"))
        elif kind in ("image_url", "video_url"):
            if role != "user":
                raise bad_request(f"{at}: images and videos go in user messages, not {role} messages", at)
            parts.append(MediaRef("image" if kind == "image_url" else "video", _url(part, kind, f"{at}.{kind}"), at))
        elif isinstance(kind, str):
            raise bad_request(f"{at}: content part type {kind!r} is not supported (text, image_url, video_url)",
                              f"{at}.type")
        else:
            raise bad_request(f"{at} must be an object with a 'type' (text, image_url, video_url)", at)
    return tuple(parts)


def parse_messages(messages: Any) -> tuple[ChatMessage, ...]:
    if messages is None:
        raise bad_request("'messages' is required", "messages")
    if not isinstance(messages, list):
        raise bad_request(f"'messages' must be an array, got {_type_name(messages)}", "messages")
    if not messages:
        raise bad_request("'messages' must hold at least one message", "messages")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{at} must be an object with 'role' and 'content', got {_type_name(m)}", at)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            what = "tool calls are" if role in ("tool", "function") else f"role {role!r} is"
            raise bad_request(f"{at}.role: {what} not supported (system, developer, user, assistant)", f"{at}.role")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad_request(f"{at}: tool calls are not supported", f"{at}.tool_calls")
        out.append(ChatMessage(ROLES[role], _parts(m.get("content"), ROLES[role], f"{at}.content")))
    return tuple(out)


def parse_chat_request(body: Any, *, served_model: str, max_context: int) -> ChatRequest:
    """Validate a request body (see the module docstring); raises ``APIError``."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_type_name(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request(f"'model' must be a string, got {_type_name(model)}", "model")
    if model is not None and model != served_model:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {served_model!r}",
                       param="model", code="model_not_found")
    messages = parse_messages(body.get("messages"))
    _unsupported(body)
    n = _int(body, "n", 1, 2**31)
    if n not in (None, 1):
        raise bad_request(f"'n' must be 1 (one choice per request), got {n}", "n")
    max_tokens = _int(body, "max_completion_tokens", 1, max_context)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", 1, max_context)
    sampling = Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0),
        top_p=_number(body, "top_p", 0.0, 1.0, lo_open=True),
        top_k=_int(body, "top_k", -1, 2**31),
        min_p=_number(body, "min_p", 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 10.0, lo_open=True),
        seed=_int(body, "seed", *SEED_RANGE),
        stop=_stop(body.get("stop")),
    )
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad_request(f"'stream_options' must be an object, got {_type_name(opts)}", "stream_options")
    include_usage = _bool(opts or {}, "include_usage")
    return ChatRequest(messages, sampling, stream, include_usage)


def generation_kwargs(s: Sampling, prompt_tokens: int, max_context: int) -> dict[str, Any]:
    """Keyword arguments of ``resolve_settings`` for one request (OpenAI semantics: no top-k unless asked)."""
    max_new = s.max_tokens if s.max_tokens is not None else max_context - prompt_tokens
    kw: dict[str, Any] = dict(max_new_tokens=max(1, max_new), seed=s.seed, stop_strings=list(s.stop))
    if s.repetition_penalty is not None:
        kw["repetition_penalty"] = s.repetition_penalty
    if not s.greedy:
        kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, min_p=s.min_p,
                  top_k=0 if s.top_k in (None, -1) else s.top_k)
    return kw
