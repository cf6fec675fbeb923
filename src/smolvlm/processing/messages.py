"""Chat messages: the one parser of the chat format (SPEC §3.4).

A chat is a list of ``{"role": ..., "content": [items]}``; items are ``{"type": "text", "text": str}``,
``{"type": "image", <source>}`` and ``{"type": "video", <source>}``. Image sources are the first of
the ``image`` / ``url`` / ``path`` / ``base64`` keys an item has, video sources of ``video`` /
``url`` / ``path`` (5.23 ``_multimodal_inputs_from_conversations`` order; 5.23 would take every
key present, we take the first). A bare ``base64`` string gets a ``data:image/unknown;base64,``
prefix, as 5.23 does.

``validate_messages`` is strict (string content is refused: the checkpoint's template would drop
it); ``as_messages`` is the lenient entry of ``SmolVLMProcessor.chat_inputs`` and
``smolvlm.stream``: a prompt string becomes one user turn, string content one text item.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from smolvlm.processing.errors import ChatError

Message = Mapping[str, Any]

IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")  # 5.23 _multimodal_inputs_from_conversations order
VIDEO_SOURCE_KEYS = ("video", "url", "path")  # same function, video items
_REMOTE = ("http://", "https://", "data:")


def as_messages(messages_or_prompt: str | Sequence[Message],
                images: Sequence[Any] | None = None) -> list[dict[str, Any]]:
    """A chat, or a prompt string with images -> a valid chat with list content.

    A string is one user turn: one image item per image (carrying it), then the text. In a chat,
    string content becomes one text item; images go inside the messages, so ``images=`` is refused.
    """
    if isinstance(messages_or_prompt, str):
        items: list[dict[str, Any]] = [{"type": "image", "image": img} for img in images or ()]
        messages = [{"role": "user", "content": [*items, {"type": "text", "text": messages_or_prompt}]}]
    else:
        if images:
            raise ChatError("pass images inside the messages ({'type': 'image', 'image': ...}), not as images=")
        if not isinstance(messages_or_prompt, Sequence) or isinstance(messages_or_prompt, bytes):
            got = type(messages_or_prompt).__name__
            raise ChatError(f"messages must be a prompt string or a list of dicts, got {got}")
        messages = [
            {**m, "content": [{"type": "text", "text": m["content"]}]}
            if isinstance(m, Mapping) and isinstance(m.get("content"), str) else m
            for m in messages_or_prompt
        ]
    validate_messages(messages)
    return messages


def validate_messages(messages: Sequence[Message]) -> None:
    """Clear errors for malformed chats (instead of a Jinja traceback or silently lost text)."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ChatError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ChatError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.120}")
        content = m["content"]
        if isinstance(content, str):
            raise ChatError(
                f"message {i} ({m['role']}): message content must be a list of typed items such as "
                f"[{{'type': 'text', 'text': ...}}, {{'type': 'image'}}], not a string (the checkpoint's template "
                "would silently drop it)"
            )
        if not isinstance(content, Sequence) or not content:
            raise ChatError(f"message {i} ({m['role']}): content must be a non-empty list of typed items")
        for j, item in enumerate(content):
            if not isinstance(item, Mapping) or "type" not in item:
                raise ChatError(f"message {i} item {j}: each content item needs a 'type', got {item!r:.120}")
            if item["type"] == "text" and not isinstance(item.get("text"), str):
                raise ChatError(f"message {i} item {j}: a text item needs a string 'text'")


def has_video(messages: Sequence[Message]) -> bool:
    return any(
        isinstance(item, Mapping) and item.get("type") == "video"
        for m in messages if isinstance(m, Mapping) and not isinstance(m.get("content"), str)
        for item in (m.get("content") or [])
    )


def text_items(messages: Sequence[Message]) -> list[str]:
    """The text of every text item, in order (what a user or caller wrote, as opposed to the template)."""
    return [item["text"] for m in messages for item in m["content"] if item["type"] == "text"]


def _collect(messages: Sequence[Message], kind: str, keys: tuple[str, ...], required: bool) -> list[Any]:
    """Sources of the ``kind`` items, in order: the first of ``keys`` each item has."""
    validate_messages(messages)
    found, missing = [], []
    for i, m in enumerate(messages):
        for j, item in enumerate(m["content"]):
            if item["type"] != kind:
                continue
            present = [k for k in keys if k in item]
            if not present:
                missing.append(f"message {i} item {j}")
                continue
            src = item[present[0]]
            if present[0] == "base64" and isinstance(src, str):
                src = src if src.startswith("data:image/") else "data:image/unknown;base64," + src
            found.append(src)
    if missing and (found or required):
        alternative = "" if required else f", or none of them and pass the {kind}s separately"
        raise ChatError(f"{', '.join(missing)}: the {kind} item(s) carry no {kind}; give every {kind} item one of "
                        f"{', '.join(repr(k) for k in keys)}{alternative}")
    return found


def collect_images(messages: Sequence[Message], *, required: bool = False) -> list[Any]:
    """Image sources referenced by the messages, in order (``image``/``url``/``path``/``base64`` keys).

    Returns ``[]`` when no image item carries data (images are then passed separately). Raises
    ``ChatError`` when only some do, since markers and images would no longer line up, or, with
    ``required``, when any image item has no source.
    """
    return _collect(messages, "image", IMAGE_SOURCE_KEYS, required)


def collect_videos(messages: Sequence[Message], *, required: bool = False) -> list[Any]:
    """Video sources of ``{"type": "video", "video"|"url"|"path": ...}`` items, in order.

    A source is whatever ``SmolVLMProcessor`` takes as one video: a file path, a list of frames
    (PIL images, arrays or image paths), a ``(T, H, W, 3)`` array or a preloaded ``VideoFrames``.
    ``[]`` / ``ChatError`` as in ``collect_images``.
    """
    return _collect(messages, "video", VIDEO_SOURCE_KEYS, required)


def check_image_sources(messages: Sequence[Message]) -> None:
    """Fail early (e.g. before a slow model load) on a local image path that does not exist.

    URLs and ``data:`` URIs, PIL images, arrays and bytes are left to the image loader.
    """
    for src in collect_images(messages):
        if isinstance(src, (str, Path)) and not str(src).startswith(_REMOTE):
            if not Path(src).expanduser().is_file():
                raise FileNotFoundError(f"image file not found: {src}")
