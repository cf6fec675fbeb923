"""The checkpoint's own Jinja chat template, rendered as transformers 5.23 renders it (SPEC §3.4).

Environment (5.23 ``utils/chat_template_utils._cached_compile_jinja_template``): jinja2
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, a ``tojson`` filter that does not HTML-escape, and the globals
``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``. Template variables:
``messages``, ``add_generation_prompt``, ``tools``/``documents`` (None) and the special tokens
(``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``). Messages are first rebuilt out of
plain JSON values: media objects (PIL images, arrays, bytes) are replaced by the placeholder
``"<TypeName>"``, as 5.23 does, so the sandboxed template never sees them.

Template lookup order (5.23 ``ProcessorMixin.from_pretrained``): ``chat_template.json``, then
``chat_template.jinja``, then ``tokenizer_config.json["chat_template"]``.

Video: a conversation with a ``{"type": "video"}`` item is rendered with
``DEFAULT_VIDEO_CHAT_TEMPLATE`` (video items -> ``<video>``) when no template is given, as 5.23
``SmolVLMProcessor.apply_chat_template`` does (the processor applies it to SmolVLM v1 checkpoints
too). Parsing messages (validation, image and video sources) is ``messages.py``'s.

``render_pieces`` renders the same string split into template output and the text items' text, so
that the processor can tokenize user text as plain text (``prompt.Prompt``).

Deliberate difference: 5.23 renders a message whose ``content`` is a plain string as nothing
(``"User: <end_of_utterance>\\n"``, because the template iterates the string's characters). We
raise ``ChatError`` instead of silently dropping the text; wrap strings as
``[{"type": "text", "text": ...}]``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smolvlm.processing.errors import ChatError
from smolvlm.processing.messages import Message, validate_messages

# 5.23 processing_smolvlm.DEFAULT_CHAT_TEMPLATE: the SmolVLM2 processor switches to this built-in
# template (video items render as "<video>") when a conversation holds a video and no template is given.
DEFAULT_VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}"
    "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def load_chat_template(directory: str | Path) -> str:
    """The checkpoint's chat template string (lookup order in the module docstring)."""
    d = Path(directory)
    if (d / "chat_template.json").is_file():
        return json.loads((d / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    if (d / "tokenizer_config.json").is_file():
        t = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        if isinstance(t, list):  # named templates: [{"name": ..., "template": ...}]
            t = {x["name"]: x["template"] for x in t}.get("default")
        if isinstance(t, str):
            return t
    raise FileNotFoundError(f"no chat template in {d} (chat_template.json, chat_template.jinja, tokenizer_config.json)")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (5.23 AssistantTracker, untracked)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes, as 5.23's TemplateNamespace."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (same trick as jinja's Namespace)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        super().__setitem__(name, value)


@lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *a, **k: dict(*a, **k)
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def _plain(value: Any) -> Any:
    """Rebuild template inputs out of JSON types; anything else -> "<TypeName>" (5.23 behaviour)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def render_chat(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """Render one conversation with ``template`` (5.23 ``render_jinja_template``)."""
    validate_messages(messages)
    kwargs = _plain({**(special_tokens or {}), **extra})
    return compile_template(template).render(
        messages=_plain(list(messages)),
        tools=None,
        documents=None,
        add_generation_prompt=add_generation_prompt,
        **kwargs,
    )


# A text item's stand-in while rendering: private-use characters around the item's index.
_STAND_IN = re.compile("\ue000(\\d+)\ue001")


def _stand_in(k: int) -> str:
    return f"\ue000{k}\ue001"


def render_pieces(
    template: str,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str | None] | None = None,
) -> list[tuple[str, bool]]:
    """``render_chat`` as ``(text, plain)`` pieces: template output (False) and text items' text (True).

    Each text item is rendered as a stand-in, which is then replaced by the item's text. Raises
    ``ChatError`` when the template does not print every text item once and unchanged (then the
    user's text cannot be told apart from the template's).
    """
    validate_messages(messages)
    texts: list[str] = []

    def stand_in(item: Mapping[str, Any]) -> Mapping[str, Any]:
        if item["type"] != "text":
            return item
        texts.append(item["text"])
        return {**item, "text": _stand_in(len(texts) - 1)}

    stubbed = [{**m, "content": [stand_in(item) for item in m["content"]]} for m in messages]
    kw = dict(add_generation_prompt=add_generation_prompt, special_tokens=special_tokens)
    parts = _STAND_IN.split(render_chat(template, stubbed, **kw))
    pieces, seen = [], []
    for k, part in enumerate(parts):
        if k % 2 == 0:
            pieces.append((part, False))
        elif int(part) < len(texts):
            seen.append(int(part))
            pieces.append((texts[int(part)], True))
    pieces = [p for p in pieces if p[0]]
    same_text = "".join(t for t, _ in pieces) == render_chat(template, messages, **kw)
    if sorted(seen) != list(range(len(texts))) or not same_text:
        raise ChatError(
            "this chat template does not print each text item once and unchanged, so special-token strings "
            "in the text cannot be kept as plain text; remove them, or pass allow_special_tokens=True"
        )
    return pieces
