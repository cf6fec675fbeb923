"""Validation of users' samples (``training/validate.py``): each bad kind dropped with its name and reason,
the summary counts, the truncation rule, nothing kept is an error, a bad sample never stops training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from smolvlm.data.cauldron import DataError
from smolvlm.data.sources import JsonlSource
from smolvlm.training.validate import check_sample, prepare_data, validate
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training.build import write_processor_files
from smolvlm.training.data import SFTDataset
from smolvlm.training.recipe import DataRecipe, ModelRecipe
from tests._video_fixtures import encode_video, truncate_file
from tests.helpers import make_image


@pytest.fixture(scope="module")
def processor(ref256, tmp_path_factory) -> SmolVLMProcessor:
    """The published 256M tokenizer/template with 32 px tiles and S = 4 (tiny, fast)."""
    mr = ModelRecipe(tokenizer=str(ref256), processor={"do_image_splitting": False, "size": {"longest_edge": 32}})
    return SmolVLMProcessor.from_pretrained(write_processor_files(mr, 32, 4, tmp_path_factory.mktemp("proc")))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def qa(user: str = "What is it?", answer: str = "A square.", images: list | None = None, **extra) -> dict:
    return {"images": images or [], "texts": [{"user": user, "assistant": answer}], **extra}


@pytest.fixture
def media(tmp_path) -> Path:
    make_image(24, 20, 0).save(tmp_path / "ok.png")
    buf = io.BytesIO()
    make_image(24, 20, 1).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a download cut short
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    good = encode_video(tmp_path / "ok.mp4", num_frames=20, fps=10, width=32, height=32)
    truncate_file(good, tmp_path / "cut.mp4", 0.3)
    return tmp_path


def test_each_bad_kind_is_dropped_by_name_with_reason(media, processor, capsys):
    f = write_jsonl(media / "data.jsonl", [
        qa(images=["ok.png"]),                                                    # 1 good
        qa(images=["missing.png"]),                                               # 2
        qa(images=["cut.png"]),                                                   # 3
        qa(images=["junk.png"]),                                                  # 4
        qa(video="cut.mp4"),                                                      # 5
        qa(video="gone.mp4"),                                                     # 6
        qa(user="<image> and <image>?", images=["ok.png"]),                       # 7
        qa(answer="   "),                                                         # 8
        {"messages": [{"role": "user", "content": "hello?"}]},                    # 9
        "{not json",                                                              # 10
        {"question": "q", "answer": "a"},                                         # 11
        {"messages": [{"role": "user", "content": [{"type": "video", "path": "ok.mp4"}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "fine"}]},                 # 12 good
    ])
    kept = validate(JsonlSource(f), processor, what="train", progress=False)
    assert len(kept) == 2 and [s["_name"] for s in kept] == [f"{f}:1", f"{f}:12"]
    got = {name: reason for name, reason, _ in kept.report.dropped}
    assert got == {f"{f}:2": "missing file", f"{f}:3": "corrupt image", f"{f}:4": "corrupt image",
                   f"{f}:5": "corrupt video", f"{f}:6": "missing file", f"{f}:7": "image count mismatch",
                   f"{f}:8": "empty answer", f"{f}:9": "no assistant turn", f"{f}:10": "unreadable",
                   f"{f}:11": "bad layout"}
    assert kept.report.counts() == {"missing file": 2, "corrupt image": 2, "corrupt video": 1, "image count mismatch": 1,
                                    "empty answer": 1, "no assistant turn": 1, "unreadable": 1, "bad layout": 1}
    err = capsys.readouterr().err
    assert f"dropped {f}:2: missing file: image {media / 'missing.png'}" in err
    assert f"dropped {f}:10: unreadable: not valid JSON" in err
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("train: kept 2 of 12 samples; dropped 10 (")
    assert "missing file 2" in summary and "corrupt image 2" in summary and "unreadable 1" in summary


def test_truncation_rule(media, processor):
    long_text = " ".join(f"w{i}" for i in range(40))
    recs = [
        qa(answer=long_text),                                                     # 1 text only: cut, kept
        {"messages": [{"role": "user", "content": [{"type": "text", "text": long_text}, {"type": "image", "path": "ok.png"}]},
                      {"role": "assistant", "content": "short"}]},                # 2 image after the cut: dropped
        qa(user=long_text, images=["ok.png"]),                                    # 3 image kept, answer cut off: dropped
        qa(images=["ok.png"]),                                                    # 4 short: untouched
    ]
    src = JsonlSource(write_jsonl(media / "long.jsonl", recs))
    full = [check_sample(src[i], processor)[0] for i in range(4)]
    L = 30
    assert min(full[:3]) > L >= full[3]
    kept = validate(src, processor, what="long", max_length=L, progress=False)
    assert [s["_name"].rsplit(":", 1)[1] for s in kept] == ["1", "4"]
    assert kept.report.truncated == 1 and "1 truncated to 30 tokens" in kept.report.summary()
    why = {n.rsplit(":", 1)[1]: (r, d) for n, r, d in kept.report.dropped}
    assert why["2"][0] == why["3"][0] == "too long"
    assert "inside an image" in why["2"][1] and "no answer token" in why["3"][1]
    ds = SFTDataset(kept, processor, max_length=L)
    first = ds[0]
    assert first["input_ids"].shape[0] == L and int((first["labels"] != -100).sum()) > 0
    assert ds[1]["input_ids"].shape[0] == full[3]
    assert check_sample(src[0], processor, max_length=L) == (full[0], L)


def test_all_dropped_is_a_clear_error(media, processor):
    f = write_jsonl(media / "bad.jsonl", [qa(images=["missing.png"]), qa(answer="")])
    with pytest.raises(DataError, match=r"no usable sample, all 2 were dropped \((missing file 1, empty answer 1|"
                                        r"empty answer 1, missing file 1)\)"):
        validate(JsonlSource(f), processor, what=str(f), progress=False)


def test_a_sample_broken_after_validation_is_skipped(media, processor, capsys):
    (media / "late.png").write_bytes((media / "ok.png").read_bytes())
    f = write_jsonl(media / "late.jsonl", [qa(images=["late.png"], answer="first"), qa(answer="second")])
    ds = SFTDataset(validate(JsonlSource(f), processor, progress=False), processor, skip_bad=True)
    (media / "late.png").unlink()
    enc = ds[0]  # the next sample instead, with a warning naming the broken one
    assert "second" in processor.tokenizer.decode(enc["input_ids"].tolist())
    assert f"skipping {f}:1" in capsys.readouterr().err


def test_prepare_data_mixture_limit_and_eval(media, processor):
    a = write_jsonl(media / "a.jsonl", [qa(answer=f"a{i}") for i in range(6)] + [qa(answer="")])
    b = write_jsonl(media / "b.jsonl", [qa(answer=f"b{i}") for i in range(4)])
    ev = write_jsonl(media / "ev.jsonl", [qa(answer="e"), "oops"])
    d = DataRecipe(mixture=[{"format": "jsonl", "path": str(a), "weight": 1}, {"format": "jsonl", "path": str(b), "weight": 3}],
                   eval_path=str(ev), limit=5, seed=3)
    train, evs = prepare_data(d, processor, progress=False, out=io.StringIO())
    names = [train[i]["_name"] for i in range(len(train))]
    assert len(train) == 9 and sum(n.startswith(str(b)) for n in names) == 7  # 5 + 4 kept, split 1:3
    assert len(evs) == 1 and evs.report.counts() == {"unreadable": 1}
