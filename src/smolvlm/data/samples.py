"""Users' samples -> one conversation: chat messages plus the images and videos they place.

Two sample layouts are read (``sources.py`` gives them, ``training/data.py`` encodes them):

* the_cauldron: ``{"images": [...], "texts": [{"user", "assistant"}, ...]}``, optionally with
  ``"video"`` / ``"videos"`` (SmolVLM2 video samples). Without ``<image>`` / ``<video>`` markers in
  the user text, every image (then every video) opens the first user turn, exactly as
  ``cauldron.sample_to_messages`` does; with markers, each marker is where the next image (video)
  goes, LLaVA style, and the counts must match.
* chat messages (transformers / OpenAI): ``{"messages": [{"role", "content"}, ...]}``; content a
  string or a list of parts ``{"type": "text"}``, ``{"type": "image", "image"|"path"|"url"|"base64": src}``,
  ``{"type": "image_url", "image_url": {"url": src}}``, ``{"type": "video", "video"|"path"|"url": src}``.
  An image part without a source (TRL layout) or a ``<image>`` marker in user text takes the next
  entry of a top-level ``"images"`` list (videos likewise from ``"videos"``).

Every problem is a ``SampleError`` with a short ``reason`` (the validation summary counts them) and
a detail naming what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smolvlm.data.cauldron import DataError, sample_to_messages

UNREADABLE = "unreadable"
LAYOUT = "bad layout"
MISSING_FILE = "missing file"
CORRUPT_IMAGE = "corrupt image"
CORRUPT_VIDEO = "corrupt video"
MEDIA_COUNT = "image count mismatch"
EMPTY_ANSWER = "empty answer"
NO_ASSISTANT = "no assistant turn"
TOO_LONG = "too long"

NAME, ERROR = "_name", "_error"  # keys the readers add: the sample's name, a read error
_MARKER = re.compile(r"(<image>|<video>)")
_REMOTE = ("http://", "https://", "data:")
IMAGE_KEYS, VIDEO_KEYS = ("image", "path", "url", "base64"), ("video", "path", "url")


class SampleError(DataError):
    """One sample that cannot be trained on: ``reason`` (a category) and a readable detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Conversation:
    """Chat messages whose image / video parts carry no source; ``images`` / ``videos`` in part order."""

    messages: list[dict[str, Any]]
    images: list[Any] = field(default_factory=list)
    videos: list[Any] = field(default_factory=list)


def sample_name(sample: Any, default: str = "?") -> str:
    return str(sample.get(NAME) or sample.get("id") or default) if isinstance(sample, dict) else default


# -- relative paths ----------------------------------------------------------------------------
def resolve_source(src: Any, base: Path | None) -> Any:
    """A media source with local relative paths made relative to ``base``; a ``{bytes, path}`` struct
    (the_cauldron parquet) becomes its bytes, or its path when there are none."""
    if isinstance(src, dict) and ("bytes" in src or "path" in src) and "type" not in src:
        src = src.get("bytes") or src.get("path")
    if isinstance(src, str) and base is not None and not src.startswith(_REMOTE) and not Path(src).is_absolute():
        return str(base / src)
    return src


def resolve_paths(sample: dict[str, Any], base: Path | None) -> dict[str, Any]:
    """A copy of a raw sample whose image / video paths are relative to ``base`` (the data file's folder)."""
    out = dict(sample)
    for key in ("images", "videos"):
        if isinstance(out.get(key), list):
            out[key] = [resolve_source(x, base) for x in out[key]]
    if "video" in out and not isinstance(out["video"], list):
        out["video"] = resolve_source(out["video"], base)
    if isinstance(out.get("messages"), list):
        msgs = []
        for m in out["messages"]:
            if isinstance(m, dict) and isinstance(m.get("content"), list):
                m = {**m, "content": [_resolve_part(p, base) for p in m["content"]]}
            msgs.append(m)
        out["messages"] = msgs
    return out


def _resolve_part(p: Any, base: Path | None) -> Any:
    if not isinstance(p, dict):
        return p
    p = dict(p)
    if p.get("type") == "image_url":
        url = p.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        p = {"type": "image", "image": url}
    if p.get("type") in ("image", "video"):
        for k in ("image", "video", "path", "url"):
            if k in p:
                p[k] = resolve_source(p[k], base)
    return p


# -- layouts -> conversation ------------------------------------------------------------------
class _Media:
    """The sample's top-level images / videos, handed out in order to sourceless parts and markers."""

    def __init__(self, images: list[Any], videos: list[Any]) -> None:
        self.pool = {"image": list(images), "video": list(videos)}
        self.used = {"image": 0, "video": 0}
        self.images: list[Any] = []
        self.videos: list[Any] = []

    def take(self, kind: str, src: Any = None) -> dict[str, str]:
        if src is None:
            pool, k = self.pool[kind], self.used[kind]
            if k >= len(pool):
                raise SampleError(MEDIA_COUNT, f"more {kind} markers / parts than the {len(pool)} {kind}(s) the sample has")
            src, self.used[kind] = pool[k], k + 1
        (self.images if kind == "image" else self.videos).append(src)
        return {"type": kind}

    def check_all_used(self) -> None:
        for kind, pool in self.pool.items():
            if self.used[kind] != len(pool):
                raise SampleError(MEDIA_COUNT, f"the sample has {len(pool)} {kind}(s) but its text places {self.used[kind]}")


def _text_parts(text: str, role: str, media: _Media) -> list[dict[str, Any]]:
    """Text -> text parts, ``<image>`` / ``<video>`` markers in user text -> media parts."""
    if not isinstance(text, str):
        raise SampleError(LAYOUT, f"{role} text must be a string, got {type(text).__name__}")
    pieces = _MARKER.split(text)
    if len(pieces) > 1 and role != "user":
        raise SampleError(MEDIA_COUNT, f"{role} text holds an image/video marker; media go in user turns")
    parts: list[dict[str, Any]] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            parts.append(media.take(piece[1:-1]))
        elif piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _nonempty(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return parts or [{"type": "text", "text": ""}]


def _listify(x: Any, key: str) -> list[Any]:
    if x is None:
        return []
    if not isinstance(x, list):
        raise SampleError(LAYOUT, f"{key!r} must be a list, got {type(x).__name__}")
    return x


def _from_texts(sample: dict[str, Any], system_prompt: str | None) -> Conversation:
    texts = sample.get("texts")
    if not isinstance(texts, list) or not texts:
        raise SampleError(NO_ASSISTANT, "no 'texts' turns")
    for i, t in enumerate(texts):
        if not isinstance(t, dict) or "user" not in t or "assistant" not in t:
            raise SampleError(LAYOUT, f"turn {i} needs 'user' and 'assistant'")
        if not isinstance(t["user"], str) or not isinstance(t["assistant"], str):
            raise SampleError(LAYOUT, f"turn {i}: 'user' and 'assistant' must be strings")
    images = _listify(sample.get("images"), "images")
    videos = _listify(sample.get("videos"), "videos") + ([sample["video"]] if sample.get("video") is not None else [])
    if not videos and not any(_MARKER.search(t["user"] + t["assistant"]) for t in texts):
        return Conversation(sample_to_messages({"images": images, "texts": texts}, system_prompt), list(images))
    media = _Media(images, videos)
    msgs: list[dict[str, Any]] = []
    if system_prompt:
        msgs.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    for t in texts:
        msgs.append({"role": "user", "content": _nonempty(_text_parts(t["user"], "user", media))})
        msgs.append({"role": "assistant", "content": _nonempty(_text_parts(t["assistant"], "assistant", media))})
    if not any(media.used.values()):  # no markers: media open the first user turn (images, then videos)
        first = msgs[1 if system_prompt else 0]
        head = [media.take("image", s) for s in images] + [media.take("video", s) for s in videos]
        first["content"] = head + [p for p in first["content"] if p.get("text") != ""]
        media.used = {"image": len(images), "video": len(videos)}
    media.check_all_used()
    return Conversation(msgs, media.images, media.videos)


def _from_messages(sample: dict[str, Any], system_prompt: str | None) -> Conversation:
    raw = sample["messages"]
    if not isinstance(raw, list) or not raw:
        raise SampleError(LAYOUT, "'messages' must be a non-empty list")
    media = _Media(_listify(sample.get("images"), "images"), _listify(sample.get("videos"), "videos"))
    msgs: list[dict[str, Any]] = []
    for i, m in enumerate(raw):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "user", "assistant"):
            raise SampleError(LAYOUT, f"message {i}: role must be system, user or assistant, got {role!r}")
        content = m.get("content")
        items = [content] if isinstance(content, str) else content
        if not isinstance(items, list):
            raise SampleError(LAYOUT, f"message {i}: content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, p in enumerate(items):
            p = _resolve_part(p, None)
            kind = "text" if isinstance(p, str) else p.get("type") if isinstance(p, dict) else None
            if kind == "text":
                parts += _text_parts(p if isinstance(p, str) else p.get("text"), role, media)
            elif kind in ("image", "video"):
                if role != "user":
                    raise SampleError(LAYOUT, f"message {i} ({role}): {kind} parts go in user turns")
                keys = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
                key = next((k for k in keys if p.get(k) is not None), None)
                src = p[key] if key else None
                if key == "base64" and isinstance(src, str) and not src.startswith("data:"):
                    src = "data:image/unknown;base64," + src
                parts.append(media.take(kind, src))
            else:
                raise SampleError(LAYOUT, f"message {i} part {j}: unknown part {str(p)[:80]}")
        msgs.append({"role": role, "content": _nonempty(parts)})
    media.check_all_used()
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    return Conversation(msgs, media.images, media.videos)


def to_conversation(sample: Any, system_prompt: str | None = None) -> Conversation:
    """A raw sample (either layout) -> ``Conversation``; ``SampleError`` for anything untrainable."""
    if not isinstance(sample, dict):
        raise SampleError(UNREADABLE, f"a sample must be a JSON object / mapping, got {type(sample).__name__}")
    if sample.get(ERROR):
        raise SampleError(UNREADABLE, str(sample[ERROR]))
    if "messages" in sample:
        conv = _from_messages(sample, system_prompt)
    elif "texts" in sample:
        conv = _from_texts(sample, system_prompt)
    else:
        raise SampleError(LAYOUT, f"neither 'messages' nor 'texts' in the sample (keys: {sorted(sample)[:8]})")
    answers = [m for m in conv.messages if m["role"] == "assistant"]
    if not answers:
        raise SampleError(NO_ASSISTANT, "the conversation has no assistant turn")
    for m in answers:
        if not "".join(p.get("text", "") for p in m["content"]).strip():
            raise SampleError(EMPTY_ANSWER, "an assistant turn is empty")
    return conv
