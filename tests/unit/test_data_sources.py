"""Readers of users' data (``data/sources.py``) and their encoding (``training/data.encode_sample``):
the_cauldron parquet with image structs, both JSONL layouts with relative paths, video samples,
mixtures; random access equals sequential; labels are exactly the assistant tokens."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from smolvlm.data.samples import to_conversation
from smolvlm.data.sources import JsonlSource, Mixture, ParquetSource, check_paths, open_source
from smolvlm.training.validate import check_sample
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training.build import write_processor_files
from smolvlm.training.data import MediaOptions, encode_sample
from smolvlm.training.recipe import DataRecipe, ModelRecipe
from tests._video_fixtures import encode_video
from tests.helpers import make_image

EOU = "<end_of_utterance>"


@pytest.fixture(scope="module")
def processor(ref256, tmp_path_factory) -> SmolVLMProcessor:
    """The published 256M tokenizer/template with 32 px tiles and S = 4 (tiny, fast)."""
    mr = ModelRecipe(tokenizer=str(ref256), processor={"do_image_splitting": False, "size": {"longest_edge": 32}})
    return SmolVLMProcessor.from_pretrained(write_processor_files(mr, 32, 4, tmp_path_factory.mktemp("proc")))


def png(seed: int, w: int = 24, h: int = 20) -> bytes:
    buf = io.BytesIO()
    make_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def assert_answer_labels(enc: dict, processor, answers: list[str]) -> None:
    """Trained tokens are exactly `` {answer}<end_of_utterance>`` of every answer, in order."""
    ids, labels = enc["input_ids"], enc["labels"]
    trained = labels != -100
    assert torch.equal(labels[trained], ids[trained])
    want = [t for a in answers for t in processor.tokenizer.encode(" " + a + EOU)]
    assert ids[trained].tolist() == want
    assert not bool(trained[ids == processor.image_token_id].any())


# -- parquet ---------------------------------------------------------------------------------------
IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
TEXTS = pa.list_(pa.struct([("user", pa.string()), ("assistant", pa.string()), ("source", pa.string())]))


def write_cauldron(path: Path, rows: list[dict], row_group_size: int = 2) -> Path:
    table = pa.table({"images": pa.array([r["images"] for r in rows], IMAGES),
                      "texts": pa.array([r["texts"] for r in rows], TEXTS)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def cauldron_rows(n: int, start: int = 0) -> list[dict]:
    return [{"images": [{"bytes": png(start + i), "path": None}] * (1 + (start + i) % 2),
             "texts": [{"user": f"question {start + i}?", "assistant": f"answer {start + i}", "source": "t"}]}
            for i in range(n)]


def test_parquet_reader_random_access_and_encoding(tmp_path, processor):
    folder = tmp_path / "shards"
    folder.mkdir()
    write_cauldron(folder / "train-00000-of-00002.parquet", cauldron_rows(5))
    write_cauldron(folder / "train-00001-of-00002.parquet", cauldron_rows(3, start=5))
    src = ParquetSource(folder, cache_size=2)
    assert len(src) == 8 and len(src._groups) == 5  # 3 + 2 row groups
    seq = [src[i] for i in range(len(src))]
    assert [s["_name"] for s in seq[4:6]] == [f"{folder / 'train-00000-of-00002.parquet'}#4",
                                               f"{folder / 'train-00001-of-00002.parquet'}#0"]
    assert [s["texts"][0]["assistant"] for s in seq] == [f"answer {i}" for i in range(8)]
    assert seq[3]["images"][0] == png(3) and len(seq[3]["images"]) == 2  # the struct's bytes
    for i in [7, 0, 5, 2, 6, 1, 4, 3, -1]:  # random order, through the LRU cache
        assert src[i] == seq[i]
    assert len(src._cache) <= 2
    with pytest.raises(IndexError):
        src[8]
    assert len(ParquetSource(folder, limit=3)) == 3
    enc = encode_sample(seq[1], processor)
    assert enc["pixel_values"].shape[0] == 2
    assert_answer_labels(enc, processor, ["answer 1"])


def test_parquet_image_struct_with_path_only(tmp_path, processor):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(9))
    rows = [{"images": [{"bytes": None, "path": "img/a.png"}], "texts": [{"user": "q", "assistant": "a", "source": None}]}]
    s = ParquetSource(write_cauldron(tmp_path / "d.parquet", rows))[0]
    assert s["images"] == [str(tmp_path / "img" / "a.png")]
    assert check_sample(s, processor)[0] == len(encode_sample(s, processor)["input_ids"])


def test_parquet_without_texts_is_an_error(tmp_path):
    pq.write_table(pa.table({"question": ["q"]}), tmp_path / "x.parquet")
    with pytest.raises(ValueError, match="no 'texts' column"):
        ParquetSource(tmp_path / "x.parquet")


# -- JSONL -------------------------------------------------------------------------------------------
def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def images_dir(tmp_path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    for i in range(3):
        (d / f"{i}.png").write_bytes(png(i, 30 + 8 * i, 20))
    return d


def test_jsonl_cauldron_layout_relative_paths(tmp_path, images_dir, processor):
    f = write_jsonl(tmp_path / "data.jsonl", [
        {"images": ["img/0.png"], "texts": [{"user": "What?", "assistant": "A thing."}]},
        "",  # blank lines are skipped, line numbers kept
        {"images": ["img/1.png", "img/2.png"], "texts": [{"user": "Compare.", "assistant": "Left."},
                                                         {"user": "Sure?", "assistant": "Yes."}]},
    ])
    src = JsonlSource(f)
    assert len(src) == 2
    s = src[1]
    assert s["_name"] == f"{f}:3"
    assert s["images"] == [str(images_dir / "1.png"), str(images_dir / "2.png")]
    enc = encode_sample(s, processor)
    assert enc["pixel_values"].shape[0] == 2
    assert_answer_labels(enc, processor, ["Left.", "Yes."])


def test_jsonl_messages_layout_images_anywhere(tmp_path, images_dir, processor):
    rec = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "First this:"}, {"type": "image", "image": "img/0.png"},
                                     {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": "A photo."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/1.png"}},
                                     {"type": "text", "text": "and this one"}, {"type": "image", "path": "img/2.png"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Two more photos."}]},
    ]}
    s = JsonlSource(write_jsonl(tmp_path / "chat.jsonl", [rec]))[0]
    conv = to_conversation(s)
    assert conv.images == [str(images_dir / f"{i}.png") for i in range(3)]
    assert [p["type"] for p in conv.messages[3]["content"]] == ["image", "text", "image"]
    enc = encode_sample(s, processor)
    assert enc["pixel_values"].shape[0] == 3
    assert_answer_labels(enc, processor, ["A photo.", "Two more photos."])
    # the validator's no-pixel token count is the processor's
    assert check_sample(s, processor) == (len(enc["input_ids"]), len(enc["input_ids"]))


def test_image_markers_and_trl_layout(tmp_path, images_dir, processor):
    """``<image>`` markers in the_cauldron user text place the images (LLaVA style); image parts without
    a source take the top-level ``images`` (TRL layout)."""
    marked = {"images": ["img/0.png", "img/1.png"],
              "texts": [{"user": "Look <image> then", "assistant": "ok"}, {"user": "<image> this", "assistant": "done"}]}
    trl = {"images": ["img/2.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
                                                 {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]}]}
    src = JsonlSource(write_jsonl(tmp_path / "m.jsonl", [marked, trl]))
    conv = to_conversation(src[0])
    assert [p["type"] for p in conv.messages[0]["content"]] == ["text", "image", "text"]
    assert [p["type"] for p in conv.messages[2]["content"]] == ["image", "text"]
    assert_answer_labels(encode_sample(src[0], processor), processor, ["ok", "done"])
    assert to_conversation(src[1]).images == [str(images_dir / "2.png")]
    assert_answer_labels(encode_sample(src[1], processor), processor, ["Hello"])


def test_random_access_equals_sequential_jsonl(tmp_path):
    recs = [{"texts": [{"user": f"q{i}", "assistant": f"a{i}" * (i % 3 + 1)}]} for i in range(20)]
    src = open_source("jsonl", write_jsonl(tmp_path / "t.jsonl", recs))
    seq = [src[i] for i in range(len(src))]
    assert [src[i] for i in reversed(range(len(src)))] == seq[::-1]
    assert [s["texts"] for s in seq] == [r["texts"] for r in recs]
    assert len(open_source("jsonl", tmp_path / "t.jsonl", limit=5)) == 5


# -- video -------------------------------------------------------------------------------------------
def test_video_samples(tmp_path, processor):
    encode_video(tmp_path / "clip.mp4", num_frames=40, fps=10, width=32, height=32)  # 4 s
    chat = {"messages": [{"role": "user", "content": [{"type": "video", "path": "clip.mp4"},
                                                      {"type": "text", "text": "Describe the clip."}]},
                         {"role": "assistant", "content": "A square moves."},
                         {"role": "user", "content": "Colour?"},
                         {"role": "assistant", "content": "White."}]}
    cauldron = {"video": "clip.mp4", "texts": [{"user": "Caption the video.", "assistant": "A moving square."}]}
    src = JsonlSource(write_jsonl(tmp_path / "v.jsonl", [chat, cauldron]))
    enc = encode_sample(src[0], processor)
    assert enc["pixel_values"].shape[0] == 4  # 1 fps (the default sampling) x 4 s
    assert_answer_labels(enc, processor, ["A square moves.", "White."])
    assert check_sample(src[0], processor)[0] == len(enc["input_ids"])
    opts = MediaOptions(video_fps=2.0, video_max_frames=5)
    enc = encode_sample(src[1], processor, options=opts)
    assert enc["pixel_values"].shape[0] == 5  # 2 fps x 4 s = 8, capped at 5
    assert "five frames" in processor.tokenizer.decode(enc["input_ids"].tolist())
    assert_answer_labels(enc, processor, ["A moving square."])
    assert check_sample(src[1], processor, options=opts)[0] == len(enc["input_ids"])


# -- mixtures and paths ------------------------------------------------------------------------------
def test_mixture_proportions_and_determinism():
    a, b = [("a", i) for i in range(10)], [("b", i) for i in range(30)]
    mix = Mixture([a, b], [3.0, 1.0], seed=0)
    assert len(mix) == 40 and mix.counts == [30, 10]
    drawn = [mix[i] for i in range(len(mix))]
    assert sum(x[0] == "a" for x in drawn) == 30
    assert {x for x in drawn if x[0] == "a"} == set(a)  # the small source is repeated: all of it, 3 times
    assert len({x for x in drawn if x[0] == "b"}) == 10  # the large one subsampled without repeats
    assert [Mixture([a, b], [3.0, 1.0], seed=0)[i] for i in range(40)] == drawn
    assert [Mixture([a, b], [3.0, 1.0], seed=1)[i] for i in range(40)] != drawn
    mix = Mixture([a, b], [1, 1], seed=0, size=7)
    assert mix.counts == [4, 3] or mix.counts == [3, 4]
    with pytest.raises(ValueError, match="weights"):
        Mixture([a, b], [1, 0])


def test_check_paths(tmp_path):
    write_jsonl(tmp_path / "ok.jsonl", [{"texts": [{"user": "q", "assistant": "a"}]}])
    check_paths(DataRecipe(format="jsonl", path=str(tmp_path / "ok.jsonl")))
    with pytest.raises(ValueError, match="not found"):
        check_paths(DataRecipe(format="jsonl", path=str(tmp_path / "nope.jsonl")))
    with pytest.raises(ValueError, match="needs data.path"):
        check_paths(DataRecipe(format="cauldron"))
    with pytest.raises(ValueError, match="no .parquet files"):
        check_paths(DataRecipe(mixture=[{"format": "cauldron", "path": str(tmp_path), "weight": 1}]))
    with pytest.raises(ValueError, match=r"mixture\[0\].weight"):
        check_paths(DataRecipe(mixture=[{"format": "jsonl", "path": str(tmp_path), "weight": -1}]))


def test_synth_samples_encode_as_before(processor):
    """the_cauldron samples (synth) get the labels of the image-segment alignment they always had."""
    from smolvlm.data.cauldron import sample_to_messages
    from smolvlm.training.data import IMAGE, assistant_char_spans, char_span_labels, make_samples
    from tests.helpers import align_labels_by_blocks

    for s in make_samples("synth", 7, "train", 0):
        enc = encode_sample(s, processor, system_prompt="Answer briefly.")
        text, spans = assistant_char_spans(processor.apply_chat_template, sample_to_messages(s, "Answer briefly."))
        u_ids, u_labels = char_span_labels(processor.tokenizer, text, spans)

        def blocks(s=s) -> list[int]:
            return [len(processor(text=[IMAGE], images=[[im]])["input_ids"][0]) for im in s["images"]]

        old = align_labels_by_blocks(u_ids, u_labels, enc["input_ids"].tolist(), processor.image_token_id, blocks)
        assert enc["labels"].tolist() == old
        assert_answer_labels(enc, processor, [t["assistant"] for t in s["texts"]])
