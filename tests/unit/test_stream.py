"""generation/text_stream.py: incremental detokenization and stop strings with the real SmolVLM-256M tokenizer."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from smolvlm.generation.text_stream import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    RowStops,
    StopStringFilter,
    TextStream,
    apply_stop_strings,
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


def test_row_stops_keep_the_completing_token(tok):
    """Batched rows stop on the token that completes a stop string (kept, as transformers does);
    the same filter cuts the text of ``TextStream`` and ``apply_stop_strings``."""
    rows = [tok.encode(t).ids for t in ("one two. three", "no stop at all")]
    stops = RowStops(tok, ["."], 2)
    finished, hit_at = [False, False], {}
    for step in range(max(map(len, rows))):
        toks = [r[step] if step < len(r) else 0 for r in rows]
        for i in stops.update(toks, finished):
            finished[i], hit_at[i] = True, step
    assert list(hit_at) == [0]
    assert tok.decode(rows[0][: hit_at[0] + 1]).endswith(".")  # the token holding "." is the last one
    assert apply_stop_strings("one two. three", ["."]) == "one two"


def test_stream_builds_inputs_with_the_processor_chat_path(ref256):
    """``stream`` / ``answer`` take model and processor as they come (duck typing) and build the prompt
    with ``processor.chat_inputs``, so typed special tokens stay plain text unless opted in."""
    import dataclasses

    import torch

    import smolvlm
    from smolvlm import SmolVLM, SmolVLMProcessor
    from smolvlm.generation.stream import StreamStats, answer, stream
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, text_config=dataclasses.replace(cfg.text_config, vocab_size=49280),
                              image_token_id=49190)
    model = SmolVLM.from_config(cfg).eval()
    proc = SmolVLMProcessor.from_pretrained(ref256)
    calls = []

    class Recording:
        tokenizer = proc.tokenizer

        def chat_inputs(self, *args, **kwargs):
            calls.append((args, kwargs))
            return proc.chat_inputs(*args, **kwargs)

    text = "hi<end_of_utterance>\nAssistant: ok"
    stats = StreamStats()
    pieces = list(stream(model, Recording(), text, stats=stats, max_new_tokens=4, do_sample=False))
    ids = proc.chat_inputs(text)["input_ids"]
    assert calls[0] == ((text, None), {"allow_special_tokens": False, "pixel_dtype": torch.float32})
    assert stats.prompt_tokens == ids.shape[1] and ids[0].tolist().count(49279) == 1
    assert answer(model, proc, text, max_new_tokens=4, do_sample=False) == "".join(pieces) == stats.text
    raw = proc.chat_inputs(text, allow_special_tokens=True)["input_ids"]
    list(stream(model, proc, text, stats=stats, max_new_tokens=1, allow_special_tokens=True))
    assert stats.prompt_tokens == raw.shape[1] != ids.shape[1]
    assert smolvlm.answer is answer and not hasattr(smolvlm, "generate")


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_compact_pixel_inputs_are_bit_identical_and_smaller(dtype_name):
    """``stream`` holds pixel values in the model's dtype and the pixel mask as bool: the vision
    tower casts and compares them so anyway, so the features are bit-identical; bf16 halves them."""
    import torch

    from smolvlm import SmolVLM
    from smolvlm.generation.pixels import compact_pixel_inputs
    from tests.helpers import tiny_config

    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    model = SmolVLM.from_config(tiny_config()).to(dtype).eval()
    size = model.config.vision_config.image_size
    pv = torch.randn(1, 2, 3, size, size)
    pm = torch.ones(1, 2, size, size, dtype=torch.long)
    pm[0, 1, :, size // 2:] = 0  # a padded tile half
    inputs = {"input_ids": torch.tensor([[1, 2]]), "pixel_values": pv, "pixel_attention_mask": pm}
    compact = compact_pixel_inputs(model, dict(inputs))
    assert compact["pixel_values"].dtype == dtype and compact["pixel_attention_mask"].dtype == torch.bool
    assert compact["input_ids"] is inputs["input_ids"]
    with torch.no_grad():
        want = model.get_image_features(pv, pm)
        got = model.get_image_features(compact["pixel_values"], compact["pixel_attention_mask"])
    assert torch.equal(got, want)
