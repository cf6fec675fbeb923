"""Message parsing (processing/messages.py): the one reader of the chat format."""

from __future__ import annotations

import pytest
from PIL import Image

from smolvlm.processing import messages
from smolvlm.processing.errors import ChatError

IMG = {"type": "image"}


def _user(*items):
    return {"role": "user", "content": list(items)}


def _text(t):
    return {"type": "text", "text": t}


def test_collect_images():
    conv = [_user({"type": "image", "path": "a.png"}, _text("x"), {"type": "image", "url": "http://x/b.png"}),
            {"role": "assistant", "content": [_text("ok")]},
            _user({"type": "image", "image": "c"}, {"type": "image", "base64": "AAAA"})]
    assert messages.collect_images(conv) == ["a.png", "http://x/b.png", "c", "data:image/unknown;base64,AAAA"]
    assert messages.collect_images([_user(IMG, _text("x"))]) == []
    with pytest.raises(ChatError, match="message 1 item 0"):
        messages.collect_images([_user({"type": "image", "path": "a.png"}), _user(IMG)])
    with pytest.raises(ChatError, match="message 0 item 0: the image item"):
        messages.collect_images([_user(IMG, _text("x"))], required=True)


def test_as_messages_prompt_string_and_string_content():
    assert messages.as_messages("Describe") == [_user(_text("Describe"))]
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    conv = messages.as_messages("Compare", [red, blue])
    assert [i["type"] for i in conv[0]["content"]] == ["image", "image", "text"]
    assert messages.collect_images(conv) == [red, blue]
    conv = messages.as_messages([{"role": "user", "content": "hi"}, _user({"type": "video", "path": "v.mp4"})])
    assert conv[0]["content"] == [_text("hi")] and messages.collect_videos(conv) == ["v.mp4"]
    assert messages.text_items(conv) == ["hi"] and messages.has_video(conv)
    with pytest.raises(ChatError, match="inside the messages"):
        messages.as_messages([_user(_text("x"))], [red])
    with pytest.raises(ChatError, match="'role' and 'content'"):
        messages.as_messages([{"content": "x"}])


def test_check_image_sources(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (4, 4)).save(path)
    messages.check_image_sources(messages.as_messages("x", [str(path), "http://x/y.png", Image.new("RGB", (2, 2))]))
    with pytest.raises(FileNotFoundError, match="image file not found"):
        messages.check_image_sources(messages.as_messages("Describe", ["/nonexistent/x.png"]))
