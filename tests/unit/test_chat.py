"""Chat template rendering (SPEC §3.4), message validation, image collection, template lookup."""

from __future__ import annotations

import json

import jinja2
import numpy as np
import pytest

from smolvlm.processing import chat
from smolvlm.processing.errors import ChatError
from smolvlm.processing.processor import SmolVLMProcessor


@pytest.fixture(scope="module")
def template(ref256):
    return chat.load_chat_template(ref256)


def _user(*items):
    return {"role": "user", "content": list(items)}


IMG = {"type": "image"}


def _text(t):
    return {"type": "text", "text": t}


def test_spec_renderings(template):
    assert chat.render_chat(template, [_user(IMG, _text("Can you describe this image?"))]) == (
        "<|im_start|>User:<image>Can you describe this image?<end_of_utterance>\nAssistant:")
    assert chat.render_chat(template, [_user(_text("Answer briefly."), IMG, _text("What is this?"))]) == (
        "<|im_start|>User: Answer briefly.<image>What is this?<end_of_utterance>\nAssistant:")
    conv = [{"role": "system", "content": [_text("You are helpful.")]}, _user(IMG, IMG, _text("Compare.")),
            {"role": "assistant", "content": [_text("They differ.")]}, _user(_text("How?"))]
    assert chat.render_chat(template, conv, add_generation_prompt=False) == (
        "<|im_start|>System: You are helpful.<end_of_utterance>\nUser:<image><image>Compare.<end_of_utterance>\n"
        "Assistant: They differ.<end_of_utterance>\nUser: How?<end_of_utterance>\n")


def test_media_objects_never_reach_template(template):
    out = chat.render_chat(template, [_user({"type": "image", "image": np.zeros((2, 2, 3), np.uint8)}, _text("x"))])
    assert out == "<|im_start|>User:<image>x<end_of_utterance>\nAssistant:"
    probe = "{{ messages[0]['content'][0]['image'] }}"
    assert chat.render_chat(probe, [_user({"type": "image", "image": np.zeros(1)})]) == "<ndarray>"


def test_environment_like_transformers():
    assert chat.render_chat("{{ {'a': '<b>'} | tojson }}", [_user(_text("x"))]) == '{"a": "<b>"}'
    with pytest.raises(jinja2.exceptions.TemplateError, match="boom"):
        chat.render_chat("{{ raise_exception('boom') }}", [_user(_text("x"))])
    with pytest.raises(jinja2.exceptions.SecurityError):
        chat.render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [_user(_text("x"))])
    # trim_blocks/lstrip_blocks, loopcontrols, {% generation %}, special-token variables
    t = "{% for m in messages %}\n  {% if loop.index > 1 %}{% break %}{% endif %}{% generation %}{{ m.role }}{% endgeneration %}\n{% endfor %}{{ eos_token }}"
    assert chat.render_chat(t, [_user(_text("a")), _user(_text("b"))], special_tokens={"eos_token": "E"}) == "userE"


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "hello"}], "must be a list of typed items"),
        ([{"content": [IMG]}], "'role' and 'content'"),
        ([{"role": "user", "content": []}], "non-empty list"),
        ([_user({"text": "no type"})], "needs a 'type'"),
        ([_user({"type": "text"})], "string 'text'"),
        ("not a list", "list of dicts"),
    ],
)
def test_bad_messages(template, messages, match):
    with pytest.raises(ChatError, match=match):
        chat.render_chat(template, messages)


def test_collect_images():
    conv = [_user({"type": "image", "path": "a.png"}, _text("x"), {"type": "image", "url": "http://x/b.png"}),
            {"role": "assistant", "content": [_text("ok")]},
            _user({"type": "image", "image": "c"}, {"type": "image", "base64": "AAAA"})]
    assert chat.collect_images(conv) == ["a.png", "http://x/b.png", "c", "data:image/unknown;base64,AAAA"]
    assert chat.collect_images([_user(IMG, _text("x"))]) == []
    with pytest.raises(ChatError, match="message 1 item 0"):
        chat.collect_images([_user({"type": "image", "path": "a.png"}), _user(IMG)])


def test_template_lookup_order(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "TOK"}))
    assert chat.load_chat_template(tmp_path) == "TOK"
    (tmp_path / "chat_template.jinja").write_text("JINJA")
    assert chat.load_chat_template(tmp_path) == "JINJA"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "JSON"}))
    assert chat.load_chat_template(tmp_path) == "JSON"
    with pytest.raises(FileNotFoundError, match="no chat template"):
        chat.load_chat_template(tmp_path / "missing")


def test_processor_chat(ref256, ref2b):
    p = SmolVLMProcessor.from_pretrained(ref256)
    conv = [_user(IMG, _text("Hi"))]
    assert p.apply_chat_template(conv) == "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:"
    assert p.apply_chat_template(conv, add_generation_prompt=False).endswith("<end_of_utterance>\n")
    assert p.apply_chat_template([conv, [_user(_text("x"))]]) == [
        "<|im_start|>User:<image>Hi<end_of_utterance>\nAssistant:", "<|im_start|>User: x<end_of_utterance>\nAssistant:"]
    ids = p.apply_chat_template([_user(_text("Hi"))], tokenize=True)
    assert ids == p.tokenizer.encode("<|im_start|>User: Hi<end_of_utterance>\nAssistant:")
    # SmolVLM2 switches to the built-in video template when a video item is present (5.23 behaviour)
    p2 = SmolVLMProcessor.from_pretrained(ref2b)
    assert "<video>" in p2.apply_chat_template([_user({"type": "video", "path": "v.mp4"}, _text("?"))])
    # ... and so do SmolVLM v1 checkpoints here (5.23's Idefics3Processor would drop the video item silently)
    assert "<video>" in p.apply_chat_template([_user({"type": "video", "path": "v.mp4"}, _text("?"))])
