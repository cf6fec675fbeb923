"""Prompt expansion (SPEC §3.1, §3.3) and the processor's input checks, without transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from smolvlm.processing.errors import PromptError
from smolvlm.processing.processor import ProcessorOutput, SmolVLMProcessor
from smolvlm.processing.prompt import Prompt, check_marker_counts, expand_prompt, image_prompt_string

F, G, I = "<fake_token_around_image>", "<global-img>", "<image>"


def test_layout_strings():
    assert image_prompt_string(0, 0, 2) == f"{F}{G}{I}{I}{F}"
    assert image_prompt_string(1, 2, 1) == f"{F}<row_1_col_1>{I}{F}<row_1_col_2>{I}\n\n{F}{G}{I}{F}"
    two_rows = image_prompt_string(2, 1, 1)
    assert two_rows == f"{F}<row_1_col_1>{I}\n{F}<row_2_col_1>{I}\n\n{F}{G}{I}{F}"
    assert expand_prompt(f"a{I}b{I}", ["X", "Y"]) == "aXbY"


def test_marker_count_errors():
    check_marker_counts([f"{I}x", "y"], [1, 0])
    with pytest.raises(PromptError, match=r"prompt 1 has 2 <image> marker\(s\) but 1 image\(s\).*prompt 1: 'a<image>"):
        check_marker_counts([f"{I}", f"a{I}{I}"], [1, 1])
    with pytest.raises(PromptError, match="2 prompt"):
        check_marker_counts(["a", "b"], [1])


def test_prompt_pieces_markers_only_in_markup():
    p = Prompt(((f"<|im_start|>User:{I}", False), (f"typed {I} and <video>", True), (f"{I}<video>", False)))
    assert p.count(I) == 2 and p.count("<video>") == 1 and p.plain_count(I) == 1 and p.has_plain
    out = expand_prompt(p, ["X", "Y"])
    assert isinstance(out, Prompt) and str(out) == f"<|im_start|>User:Xtyped {I} and <video>Y<video>"
    assert out.pieces[1] == (f"typed {I} and <video>", True)  # plain text kept as is
    assert Prompt.of("a") == Prompt((("a", False),)) and Prompt.of(p) is p and not Prompt.of("a").has_plain
    check_marker_counts([p], [2])
    with pytest.raises(PromptError, match=r"1 <image> typed in the message text are plain text"):
        check_marker_counts([p], [3])


@pytest.fixture(scope="module")
def proc(ref256):
    return SmolVLMProcessor.from_pretrained(ref256)


def test_token_counts_formula(proc):
    # single-token markers: rows*cols*(S+2) + rows + (S+3); "\n\n" is one token (SPEC §3.3)
    for rows, cols in [(0, 0), (1, 4), (2, 4), (3, 4), (4, 4), (4, 1)]:
        n = len(proc.tokenizer.encode(image_prompt_string(rows, cols, 64)))
        assert n == (67 if rows == 0 else rows * cols * 66 + rows + 67)


def test_call_checks_and_outputs(proc):
    img = np.zeros((20, 30, 3), np.uint8)
    with pytest.raises(PromptError, match="1 <image> marker"):
        proc(text="<image> hi")
    with pytest.raises(PromptError, match="prompt 0 has 0"):
        proc(text="hi", images=[img])
    with pytest.raises(PromptError, match=r"2 <image> marker\(s\) in total \[1, 1\] but 3"):
        proc(text=["<image>", "<image>"], images=[img, img, img])
    with pytest.raises(ValueError, match="return_tensors"):
        proc(text="hi", return_tensors="tf")  # type: ignore[arg-type]
    out = proc(text=["<image>a", "b"], images=[[img], []], return_tensors="np", padding_side="left",
               do_image_splitting=False)
    assert isinstance(out, ProcessorOutput) and out.input_ids is out["input_ids"]
    assert out["input_ids"].dtype == np.int64 and out["input_ids"].shape == (2, 68)
    assert out["input_ids"][1, 0] == proc.tokenizer.pad_token_id and out["attention_mask"][1].sum() == 1
    assert out["pixel_values"].shape == (2, 1, 3, 512, 512)
    pt = proc(text="<image>a", images=img, do_image_splitting=False).to("cpu", dtype=torch.bfloat16)
    assert pt.pixel_values.dtype == torch.bfloat16 and pt.input_ids.dtype == torch.int64
    assert set(proc(text="plain")) == {"input_ids", "attention_mask"}
    assert proc.decode(proc(text="<image>hey", images=img, do_image_splitting=False)["input_ids"][0]) == "hey"


def test_pixel_dtype_gives_the_model_dtype_and_a_bool_mask(proc, monkeypatch):
    """``pixel_dtype`` (what ``stream`` and the server ask for: the model's dtype): the reference's
    output cast, bit for bit, for images, video frames (with text, with images, and a batch of
    videos alone); token ids unchanged. Every path writes the model's dtype as it pads: no float32 batch."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (300, 700, 3), dtype=np.uint8)
    frames = rng.integers(0, 256, (4, 60, 90, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="pixel_dtype must be a torch floating dtype"):
        proc(text="<image>a", images=img, pixel_dtype=torch.int64)
    with pytest.raises(ValueError, match="pixel_dtype needs return_tensors='pt'"):
        proc(text="<image>a", images=img, return_tensors="np", pixel_dtype=torch.bfloat16)
    from smolvlm.processing import image as image_mod, video as video_mod, video_inputs

    asked = []  # the dtype each padding was asked to write in

    def spy(samples, normalize=None, pixel_dtype=None):
        asked.append(pixel_dtype)
        return image_mod.pad_arrays(samples, normalize, pixel_dtype)

    for module in (video_mod, video_inputs):
        monkeypatch.setattr(module, "pad_arrays", spy)
    for kw in (dict(text=["<image>a", "<image><image>b"], images=[[img], [img[:40], img[:, :50]]]),
               dict(text="<video>what happens?", videos=[frames], num_frames=3),
               dict(text="<image>and <video>?", images=[[img]], videos=[[frames]], num_frames=3),
               dict(videos=[frames, frames[:2]], num_frames=3)):
        want = proc(**kw)
        got = proc(**kw, pixel_dtype=torch.bfloat16)
        if "text" in kw:
            assert torch.equal(got["input_ids"], want["input_ids"])
        assert got["pixel_values"].dtype == torch.bfloat16 and got["pixel_attention_mask"].dtype == torch.bool
        assert torch.equal(got["pixel_values"], want["pixel_values"].to(torch.bfloat16))
        assert torch.equal(got["pixel_attention_mask"], want["pixel_attention_mask"] != 0)
    assert asked == [None, torch.bfloat16] * 3  # each video path: float32 for the default, bf16 when asked


def test_from_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        SmolVLMProcessor.from_pretrained(tmp_path / "nothing")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="could not download"):
        SmolVLMProcessor.from_pretrained("someorg/not-a-real-repo")


def test_layering_processing_never_imports_model():
    import subprocess
    import sys

    code = ("import sys, smolvlm.processing.processor, smolvlm.cli.tokens; "
            "bad = [m for m in sys.modules if m.startswith(('smolvlm.model', 'transformers'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
