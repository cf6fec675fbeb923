"""Unit tests for smolvlm.processing.video / video_decode (no transformers here: see
tests/parity/test_video_parity.py for the comparisons with transformers 5.23).

Oracles used in this file: an independent sequential PyAV decode (frame i = i-th decoded frame,
converted with ``to_ndarray(format="rgb24")``), explicit Pillow computations, and the SPEC's
worked example (SPEC 4.1: a 9 s clip gives 9 frames at 00:00..00:06, 00:08, 00:09).
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from tests._video_fixtures import (
    FORMATS,
    encode_audio_only,
    encode_format,
    encode_video,
    encode_zero_frames,
    synthetic_frame,
    truncate_file,
    unknown_codec_avi,
)

from smolvlm.processing import video_decode
from smolvlm.processing.chat import DEFAULT_VIDEO_CHAT_TEMPLATE
from smolvlm.processing.video import (
    VideoError,
    VideoFrames,
    VideoNotFoundError,
    load_video,
    longest_edge_size,
    pad_videos,
    preprocess_frames,
    sample_frame_indices,
    video_prompt,
)

MEAN, STD, R = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 1 / 255


def all_frames(path: Path) -> list[np.ndarray]:
    """Independent oracle: every decoded frame, in decoder output order."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


# ------------------------------------------------------------------ sampling policy


def test_spec_worked_example_nine_seconds():
    # 93 frames at 10 fps = 9.3 s: round(9.3) = 9 frames; no skip (9.3 - 2 < 64).
    idx = sample_frame_indices(93, 10.0, 9.3)
    stamps = [f"{int(i / 10 // 60):02d}:{int(i / 10 % 60):02d}" for i in idx]
    assert stamps == ["00:00", "00:01", "00:02", "00:03", "00:04", "00:05", "00:06", "00:08", "00:09"]
    text = video_prompt(len(idx), [i / 10 for i in idx], 9.3, image_seq_len=3)
    assert text.startswith("You are provided the following series of nine frames from a 0:00:09 [H:MM:SS] video.\n")


def test_skip_secs_rule_and_cap():
    # 100 s at 10 fps: 100 - 2 > 64 * 1 -> skip 1 s at both ends, 64 frames from 10 to 990.
    idx = sample_frame_indices(1000, 10.0, 100.0)
    assert len(idx) == 64 and idx[0] == 10 and idx[-1] == 990
    # 66 s: 66 - 2 = 64 is not > 64 -> no skip, still capped at 64 frames over the whole clip.
    idx = sample_frame_indices(660, 10.0, 66.0)
    assert len(idx) == 64 and idx[0] == 0 and idx[-1] == 659
    # fps 2, max 8, 10 s: estimated 20 -> 8; 10 - 2 > 16 is false -> no skip.
    assert sample_frame_indices(100, 10.0, 10.0, fps=2.0, max_frames=8).tolist() == [0, 14, 28, 42, 56, 70, 84, 99]
    # skip_secs=0 disables skipping.
    assert sample_frame_indices(1000, 10.0, 100.0, skip_secs=0)[0] == 0
    # very short clip: at least one frame
    assert sample_frame_indices(3, 30.0, 0.1).tolist() == [0]


def test_num_frames_evenly_spaced():
    assert sample_frame_indices(30, 10.0, 3.0, num_frames=4).tolist() == [0, 9, 19, 29]
    assert sample_frame_indices(30, 10.0, 3.0, num_frames=1).tolist() == [0]
    # more frames asked than exist: unique indices, i.e. every frame once
    assert sample_frame_indices(5, 10.0, 0.5, num_frames=8).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "args, kw",
    [((0, 10.0, 1.0), {}), ((10, 0.0, 1.0), {}), ((10, 10.0, float("nan")), {}), ((10, 10.0, 1.0), {"fps": -1.0}),
     ((10, 10.0, 1.0), {"max_frames": 0}), ((10, 10.0, 1.0), {"num_frames": 0}), ((10.5, 10.0, 1.0), {})],
)
def test_sampling_rejects_bad_arguments(args, kw):
    with pytest.raises(VideoError):
        sample_frame_indices(*args, **kw)


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("name", list(FORMATS))
def test_load_video_formats(tmp_path, name):
    path = encode_format(tmp_path, name, num_frames=30, fps=10)
    ref = all_frames(path)
    assert len(ref) == 30
    # the documented packet-count assumption for containers without a frame count (mkv/webm)
    assert len(video_decode._video_packets(path)) == 30
    v = load_video(path)  # SmolVLM2 default: 3 s -> 3 frames
    assert isinstance(v, VideoFrames)
    assert (v.total_frames, v.native_fps, v.duration) == (30, 10.0, 3.0)
    assert v.indices == [0, 14, 29] and v.timestamps == [0.0, 1.4, 2.9]
    assert v.frames.dtype == np.uint8 and v.frames.shape == (3, *ref[0].shape)
    for k, i in enumerate(v.indices):
        np.testing.assert_array_equal(v.frames[k], ref[i])  # frame i is exactly the i-th decoded frame
    v = load_video(str(path), num_frames=7)
    assert v.indices == [0, 4, 9, 14, 19, 24, 29]
    for k, i in enumerate(v.indices):
        np.testing.assert_array_equal(v.frames[k], ref[i])


@pytest.mark.parametrize("name, opts", [("mp4-h264", {"g": "12", "bf": "2"}), ("mkv-h264", {"g": "12", "bf": "2"}),
                                        ("webm-vp9", {"g": "12"}), ("avi-mpeg4", {"g": "12"})])
def test_seeking_matches_sequential(tmp_path, monkeypatch, name, opts):
    path = encode_format(tmp_path, name, num_frames=120, fps=25, width=32, height=24, options=opts)
    info = video_decode.probe(path)
    idx = [0, 5, 37, 38, 61, 100, 119]
    seq = video_decode.decode_frames(path, idx, info, seek=False)

    def no_sequential(*a, **k):
        raise AssertionError("the seek path fell back to sequential decoding")

    monkeypatch.setattr(video_decode, "_decode_sequential", no_sequential)
    seek = video_decode.decode_frames(path, idx, info, seek=True)
    np.testing.assert_array_equal(seek, seq)
    ref = all_frames(path)
    np.testing.assert_array_equal(seq, np.stack([ref[i] for i in idx]))


def test_variable_frame_rate(tmp_path):
    # 11 frames 50 ms apart, then 9 frames 300 ms apart. The reference's definitions (kept):
    # fps = stream.average_rate, duration = frames / average_rate, index = decoder output order,
    # timestamp = index / fps (the average-rate estimate, not the frame's real pts).
    pts = [0] + list(np.cumsum([50] * 10 + [300] * 9))
    path = encode_video(tmp_path / "vfr.mp4", codec="libx264", num_frames=20, width=32, height=24,
                        options={"bf": "0"}, pts_ms=[int(p) for p in pts])
    with av.open(str(path)) as c:
        rate = c.streams.video[0].average_rate
    v = load_video(path, num_frames=4)
    assert v.native_fps == float(rate) and v.duration == float(Fraction(20) / rate)
    assert v.indices == [0, 6, 12, 19]
    assert v.timestamps == [i / float(rate) for i in v.indices]
    ref = all_frames(path)
    np.testing.assert_array_equal(v.frames, np.stack([ref[i] for i in v.indices]))


def test_worked_example_from_a_file(tmp_path):
    path = encode_video(tmp_path / "nine.avi", num_frames=93, fps=10, width=32, height=24)
    v = load_video(path)
    assert v.duration == pytest.approx(9.3) and len(v.indices) == 9
    text = video_prompt(len(v.indices), v.timestamps, v.duration, image_seq_len=1)
    assert "nine frames from a 0:00:09 [H:MM:SS]" in text
    assert re.findall(r"\nFrame from (\d\d:\d\d):<fake", text) == [
        "00:00", "00:01", "00:02", "00:03", "00:04", "00:05", "00:06", "00:08", "00:09"]


# ------------------------------------------------------------------ frame sequences


def test_array_and_pil_and_image_path_sources(tmp_path):
    arr = np.stack([synthetic_frame(i, 20, 10) for i in range(30)])
    v = load_video(arr)
    assert v.indices == list(range(30)) and v.native_fps == 24.0
    assert v.timestamps[-1] == 29 / 24 and v.duration == 29 / 24  # reference: duration None -> last stamp
    v = load_video(arr, num_frames=3)
    assert v.indices == [0, 14, 29]
    np.testing.assert_array_equal(v.frames, arr[[0, 14, 29]])
    pil = [Image.fromarray(f) for f in arr[:5]]
    v = load_video(pil, num_frames=2)
    assert v.indices == [0, 4] and all(im.mode == "RGB" for im in v.frames)
    np.testing.assert_array_equal(np.asarray(v.frames[1]), arr[4])
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(arr[i]).save(paths[-1])
    v = load_video([str(p) for p in paths])
    assert v.total_frames == 4 and len(v.frames) == 4
    np.testing.assert_array_equal(np.asarray(v.frames[3]), arr[3])
    with pytest.raises(VideoError, match="frame rate"):
        load_video(arr, fps=1.0)
    with pytest.raises(VideoError, match="mutually exclusive"):
        load_video(arr, fps=1.0, num_frames=3)


# ------------------------------------------------------------------ preprocessing


def test_longest_edge_size():
    assert longest_edge_size(61, 97, 2048) == (1288, 2048)  # int(2048 / (97/61)) = 1287 -> even 1288
    assert longest_edge_size(97, 61, 1536) == (1536, 966)  # int(1536 * 61/97) = 965 -> 966
    assert longest_edge_size(10, 10, 384) == (384, 384)
    assert longest_edge_size(10, 4000, 512) == (2, 512)  # int(1.28) = 1 -> 2
    assert longest_edge_size(100, 200, 10000) == (2048, 4096)  # video path caps L at 4096 first


def test_preprocess_frames_matches_explicit_pillow():
    frames = np.stack([synthetic_frame(i, 97, 61) for i in range(2)])
    out = preprocess_frames(frames, longest_edge=1536, tile_size=384, mean=MEAN, std=STD, rescale_factor=R)
    assert out.shape == (2, 3, 384, 384) and out.dtype == np.float32
    for t in range(2):
        img = Image.fromarray(frames[t]).resize((1536, 966), Image.LANCZOS).resize((384, 384), Image.LANCZOS)
        expected = (np.asarray(img, np.float32).transpose(2, 0, 1) - np.float32(127.5)) / np.float32(127.5)
        np.testing.assert_array_equal(out[t], expected)  # same arithmetic: bit-exact
    assert out.min() >= -1 and out.max() <= 1
    # PIL frames (RGBA composited on white) and a list of arrays give the same as the array path
    pil = [Image.fromarray(f) for f in frames]
    np.testing.assert_array_equal(preprocess_frames(pil, longest_edge=1536, tile_size=384, mean=MEAN, std=STD, rescale_factor=R), out)
    rgba = Image.new("RGBA", (9, 7), (0, 0, 0, 0))
    white = preprocess_frames([rgba], longest_edge=16, tile_size=8, mean=MEAN, std=STD, rescale_factor=R)
    np.testing.assert_array_equal(white, np.ones_like(white))


def test_pad_videos():
    a, b = np.ones((3, 3, 4, 4), np.float32), np.full((1, 3, 4, 4), 2, np.float32)
    pixels, mask = pad_videos([a, b])
    assert pixels.shape == (2, 3, 3, 4, 4) and mask.shape == (2, 3, 4, 4) and mask.dtype == np.int64
    assert (pixels[1, 1:] == 0).all() and mask[1, 1:].sum() == 0 and mask[0].all() and mask[1, 0].all()


# ------------------------------------------------------------------ prompt


def test_video_prompt_layout():
    block = "<fake_token_around_image><global-img>" + "<image>" * 2 + "<fake_token_around_image>"
    text = video_prompt(64, [0.0, 65.5, 3605.0], 3605.9, image_seq_len=2)
    assert text == (
        "You are provided the following series of sixty-four frames from a 1:00:05 [H:MM:SS] video.\n"
        f"\nFrame from 00:00:{block}\nFrame from 01:05:{block}\nFrame from 60:05:{block}\n\n"
    )
    assert "from a 0:00:02 [H:MM:SS]" in video_prompt(2, [0.0, 2.9], None, image_seq_len=1)  # last stamp


def test_default_template_renders_video_placeholder():
    import jinja2

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": "user", "content": [{"type": "video", "path": "x.mp4"}, {"type": "text", "text": "Describe"}]}]
    out = env.from_string(DEFAULT_VIDEO_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
    assert out == "<|im_start|>User: <video>Describe<end_of_utterance>\nAssistant:"


# ------------------------------------------------------------------ bad input


def test_bad_files(tmp_path):
    good = encode_format(tmp_path, "mp4-mpeg4")
    avi = encode_format(tmp_path, "avi-mpeg4")
    cases = {
        "missing": tmp_path / "nope.mp4",
        "garbage": tmp_path / "garbage.mp4",
        "truncated mp4 (index at the end)": truncate_file(good, tmp_path / "cut.mp4", 0.6),
        "truncated avi (header says 30 frames)": truncate_file(avi, tmp_path / "cut.avi", 0.5),
        "audio only": encode_audio_only(tmp_path / "audio.mp4"),
        "zero frames": encode_zero_frames(tmp_path / "zero.avi"),
        "unknown codec": unknown_codec_avi(avi, tmp_path / "qqqq.avi"),
        "8200 px wide": encode_video(tmp_path / "wide.avi", codec="rawvideo", pix_fmt="rgb24", num_frames=2,
                                     width=8200, height=8),
        "directory": tmp_path,
    }
    cases["garbage"].write_bytes(b"\x00\x01not a video" * 50)
    messages = {}
    for what, path in cases.items():
        with pytest.raises(VideoError) as e:
            load_video(path)
        messages[what] = str(e.value)
    assert isinstance(pytest.raises(FileNotFoundError, load_video, cases["missing"]).value, VideoNotFoundError)
    assert "not found" in messages["missing"]
    assert "no video stream" in messages["audio only"] and "audio" in messages["audio only"]
    assert "no frames" in messages["zero frames"]
    assert "unsupported codec" in messages["unknown codec"]
    assert "exceeds the limit" in messages["8200 px wide"]
    assert "truncated" in messages["truncated avi (header says 30 frames)"]


def test_bad_sequences(tmp_path):
    bad_png = tmp_path / "bad.png"
    bad_png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    for source in ([], np.zeros((0, 4, 4, 3), np.uint8), np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4, 3), np.float32),
                   np.zeros((1, 8193, 1, 3), np.uint8), [str(tmp_path / "missing.png")], [str(bad_png)], [1, 2], 42):
        with pytest.raises(VideoError):
            load_video(source)
    with pytest.raises(VideoError):
        preprocess_frames(np.zeros((1, 4, 4, 4), np.uint8), longest_edge=8, tile_size=4, mean=MEAN, std=STD, rescale_factor=R)
    with pytest.raises(VideoError):
        preprocess_frames([], longest_edge=8, tile_size=4, mean=MEAN, std=STD, rescale_factor=R)
