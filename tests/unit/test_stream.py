"""Incremental detokenization and stop strings with the real SmolVLM-256M tokenizer."""

from __future__ import annotations

import random

import pytest
from PIL import Image
from tokenizers import Tokenizer

from smolvlm.generation.stream import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopStringFilter,
    TextStream,
    apply_stop_strings,
    normalize_messages,
)

TEXTS = [
    "Hello 😀 world 你好吗 ünïcödé",
    "🤗🤗 emoji only 👩‍👩‍👧",
    "The answer is 42.\n\nNext line: 東京タワー",
    "plain ascii text, nothing special",
]


@pytest.fixture(scope="module")
def tok(ref256) -> Tokenizer:
    return Tokenizer.from_file(str(ref256 / "tokenizer.json"))


def _stream_pieces(tok, ids, stops=()):
    ts = TextStream(tok, stops)
    pieces = []
    for i in ids:
        piece, stopped = ts.push(i)
        pieces.append(piece)
        if stopped:
            return pieces, True
    pieces.append(ts.flush())
    return pieces, False


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_decode_and_never_split_chars(tok, text):
    ids = tok.encode(text).ids
    # the tokenizer really splits multi-byte characters across tokens for these inputs
    assert text == "plain ascii text, nothing special" or any(REPLACEMENT_CHAR in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == text
    assert all(REPLACEMENT_CHAR not in p for p in pieces)


def test_special_tokens_skipped(tok):
    ids = tok.encode("Hi there").ids + [49279, 198, 1] + tok.encode(" more").ids
    pieces, _ = _stream_pieces(tok, ids)
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == "Hi there\n more"


def test_invalid_trailing_bytes_are_flushed(tok):
    ids = tok.encode("ok 😀").ids[:-1]  # cut inside the emoji: decode ends with U+FFFD
    detok = IncrementalDetokenizer(tok)
    streamed = "".join(detok.push(i) for i in ids)
    assert not streamed.endswith(REPLACEMENT_CHAR)
    assert streamed + detok.flush() == tok.decode(ids)


@pytest.mark.parametrize("text,stops,expected", [
    ("Hello world. Goodbye", ["."], "Hello world"),
    ("Hello world. Goodbye", ["Good", "world."], "Hello "),
    ("abc abd abe", ["abe"], "abc abd "),
    ("no stop here", ["zzz"], "no stop here"),
    ("emoji 😀 stop", ["😀"], "emoji "),
    ("你好吗 end", ["好吗"], "你"),
])
def test_stop_strings_cut_text(tok, text, stops, expected):
    ids = tok.encode(text).ids
    pieces, stopped = _stream_pieces(tok, ids, stops)
    assert "".join(pieces) == expected == apply_stop_strings(tok.decode(ids), stops)
    assert stopped == (expected != text)


def test_partial_stop_string_never_emitted():
    f = StopStringFilter(["STOP"])
    out = [f.push(c) for c in "aST"]
    assert "".join(o for o, _ in out) == "a"  # "ST" held: could become STOP
    assert f.push("OP and more") == ("", True)
    f = StopStringFilter(["STOP"])
    assert "".join(f.push(c)[0] for c in "aSTx") == "aSTx"  # released once it cannot match
    assert f.flush() == ""
    f = StopStringFilter(["<end>"])
    assert f.push("text <en")[0] == "text "
    assert f.flush() == "<en"  # generation ended: held text was not a stop string


def test_random_splits_equal_whole_text():
    rng = random.Random(0)
    text = "one two <stop> three" * 2
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), 6))
        parts = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        f = StopStringFilter(["<stop>", "xyz"])
        out = ""
        for p in parts:
            o, stopped = f.push(p)
            out += o
            if stopped:
                break
        assert out == "one two "


def test_normalize_messages_string_prompt_and_errors():
    msgs, imgs, vids = normalize_messages("Describe")
    assert msgs == [{"role": "user", "content": [{"type": "text", "text": "Describe"}]}] and imgs == [] and vids == []
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    msgs, imgs, _ = normalize_messages("Compare", [red, blue])
    assert [i["type"] for i in msgs[0]["content"]] == ["image", "image", "text"] and imgs == [red, blue]
    msgs, _, vids = normalize_messages([{"role": "user", "content": "hi"},
                                        {"role": "user", "content": [{"type": "video", "path": "v.mp4"}]}])
    assert msgs[0]["content"] == [{"type": "text", "text": "hi"}] and vids == ["v.mp4"]
    with pytest.raises(FileNotFoundError, match="image file not found"):
        normalize_messages("Describe", ["/nonexistent/x.png"])
    with pytest.raises(ValueError, match="no image"):
        normalize_messages([{"role": "user", "content": [{"type": "image"}]}])
