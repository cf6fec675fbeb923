"""Video parity with transformers 5.23 (the project's oracle), on short videos encoded by the tests.

transformers 5.23's ``SmolVLMVideoProcessor`` (and so ``SmolVLMProcessor``/``AutoProcessor`` for
SmolVLM2) refuses to build without torchvision, which cannot be installed beside our torch. So
each assertion uses the runnable pure-Python/numpy piece of 5.23 that owns that behaviour:

* sampled indices: ``SmolVLMVideoProcessor.sample_frames`` called unbound with a stub ``self``
  (it reads ``self`` only for defaults, which we always pass) on a 5.23 ``VideoMetadata``;
* decoding, metadata, frames: ``transformers.video_utils.read_video_pyav`` (5.23's PyAV backend)
  with that sampler. For Matroska/WebM, 5.23 reads ``total_num_frames = 0`` (the demuxer stores no
  frame count) and samples frame 0 only; we count frames instead (documented deviation in
  ``video_decode.py``), so there the oracle's sampler is given the true count;
* prompt text: ``SmolVLMProcessor.replace_video_token`` called unbound with a stub ``self``, and
  ``ProcessorMixin.get_text_with_replacements`` for the ``<video>`` substitution;
* chat template: 5.23 ``processing_smolvlm.DEFAULT_CHAT_TEMPLATE`` rendered by the 5.23 tokenizer's
  ``apply_chat_template``;
* input_ids: 5.23 ``AutoTokenizer`` from shared/reference/SmolVLM2-2.2B-Instruct vs the
  ``tokenizers`` library on the same tokenizer.json;
* frame resize geometry: 5.23 ``video_processing_smolvlm.get_resize_output_image_size``;
* pixel values: the 5.23 PIL image processor ``SmolVLMImageProcessorPil`` with
  ``do_image_splitting=False`` and the same ``size``/``max_image_size``, i.e. the way
  transformers 4.50 sent video frames through the image processor (SPEC 4.1 last paragraph):
  same geometry and Pillow LANCZOS as ours. Its rescale+normalize is two float32 steps where the
  5.23 video processor (and we) use the fused ``(u8 - 127.5) / 127.5``; the resampled uint8 pixels
  are compared exactly, the float values within 1e-7 (a few float32 ulps near 1.0).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import jinja2
import numpy as np
import pytest
import torch

from tests._video_fixtures import FORMATS, encode_format, encode_video

from smolvlm.processing.chat import DEFAULT_VIDEO_CHAT_TEMPLATE
from smolvlm.processing.video import (
    load_video,
    longest_edge_size,
    preprocess_frames,
    sample_frame_indices,
    video_prompt,
)

from transformers import AutoTokenizer
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.processing_utils import ProcessorMixin
from transformers.video_utils import VideoMetadata, read_video_pyav

# import_module, not ``from transformers.models.smolvlm import ...``: the lazy package hands out a
# placeholder for modules whose backends (torchvision) are missing; the real module imports fine.
tf_proc = importlib.import_module("transformers.models.smolvlm.processing_smolvlm")
tf_video = importlib.import_module("transformers.models.smolvlm.video_processing_smolvlm")
STUB = SimpleNamespace(num_frames=64, fps=1)  # never read: every call passes num_frames and fps
S = 81  # image_seq_len of SmolVLM2-2.2B (processor_config.json)


def ref_indices(total, native_fps, duration, fps=1.0, max_frames=64, skip_secs=1):
    meta = VideoMetadata(total_num_frames=total, fps=native_fps, duration=duration)
    return tf_video.SmolVLMVideoProcessor.sample_frames(STUB, meta, num_frames=max_frames, fps=fps, skip_secs=skip_secs)


def ref_prompt(num_frames, metadata: VideoMetadata, image_seq_len=S):
    stub = SimpleNamespace(image_seq_len=image_seq_len, image_token="<image>",
                           fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    inputs = {"pixel_values": np.zeros((1, num_frames, 1, 1, 1)), "video_metadata": [metadata]}
    return tf_proc.SmolVLMProcessor.replace_video_token(stub, inputs, 0)


def test_sample_frame_indices_grid():
    rng = np.random.default_rng(0)
    cases = [(93, 10.0, 9.3, 1.0, 64, 1), (1000, 10.0, 100.0, 1.0, 64, 1), (660, 10.0, 66.0, 1.0, 64, 1),
             (7, 30.0, 7 / 30, 1.0, 64, 1), (2, 25.0, 0.08, 1.0, 64, 1)]
    for _ in range(300):
        fps_n = float(rng.choice([6.0625, 10.0, 23.976, 25.0, 29.97, 60.0]))
        total = int(rng.integers(1, 5000))
        cases.append((total, fps_n, total / fps_n, float(rng.choice([0.5, 1.0, 2.0, 3.7])),
                      int(rng.integers(1, 80)), float(rng.choice([0.0, 1.0, 2.5]))))
    for total, nfps, dur, fps, mx, skip in cases:
        ours = sample_frame_indices(total, nfps, dur, fps=fps, max_frames=mx, skip_secs=skip)
        np.testing.assert_array_equal(ours, ref_indices(total, nfps, dur, fps, mx, skip),
                                      err_msg=str((total, nfps, dur, fps, mx, skip)))


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("n, fps, sampling", [(30, 10, {}), (75, 25, {"fps": 2.0, "max_frames": 4}),
                                              (40, 10, {"fps": 1.0, "max_frames": 1})])
def test_decode_and_sample_vs_read_video_pyav(tmp_path, name, n, fps, sampling):
    path = encode_format(tmp_path, name, num_frames=n, fps=fps)
    ours = load_video(path, **sampling)
    header_has_count = FORMATS[name][0] not in (".mkv", ".webm")

    def sampler(metadata, **kw):
        if not header_has_count:
            assert metadata.total_num_frames == 0  # the 5.23 behaviour we deviate from
            metadata = VideoMetadata(total_num_frames=ours.total_frames, fps=metadata.fps,
                                     duration=ours.total_frames / metadata.fps)
        return tf_video.SmolVLMVideoProcessor.sample_frames(
            STUB, metadata, num_frames=sampling.get("max_frames", 64), fps=sampling.get("fps", 1.0))

    frames, meta = read_video_pyav(str(path), sampler)
    assert ours.indices == [int(i) for i in meta.frames_indices]
    np.testing.assert_array_equal(ours.frames, frames)  # decoded RGB frames, bit-exact
    assert ours.native_fps == meta.fps
    if header_has_count:
        assert (ours.total_frames, ours.duration) == (meta.total_num_frames, meta.duration)
        assert ours.timestamps == meta.timestamps
    assert ours.total_frames == n


def test_variable_frame_rate_vs_read_video_pyav(tmp_path):
    pts = [0] + [int(p) for p in np.cumsum([40] * 12 + [250] * 11)]
    path = encode_video(tmp_path / "vfr.mp4", codec="libx264", num_frames=24, width=32, height=24,
                        options={"bf": "0"}, pts_ms=pts)
    ours = load_video(path, num_frames=5)
    frames, meta = read_video_pyav(str(path), lambda metadata, **kw: np.linspace(0, metadata.total_num_frames - 1, 5, dtype=int))
    assert ours.indices == list(meta.frames_indices)
    assert (ours.native_fps, ours.duration, ours.total_frames) == (meta.fps, meta.duration, meta.total_num_frames)
    assert ours.timestamps == meta.timestamps
    np.testing.assert_array_equal(ours.frames, frames)
    ours = load_video(path)  # SmolVLM2 default sampling
    assert ours.indices == list(ref_indices(meta.total_num_frames, meta.fps, meta.duration))


def test_prompt_vs_replace_video_token():
    cases = [(9, [0, 11, 23, 34, 46, 57, 69, 80, 92], 10.0, 9.3),  # SPEC worked example
             (64, [10 * i for i in range(64)], 9.5, 640 / 9.5), (3, [0, 700, 1499], 25.0, 3605.2),
             (5, [0, 1, 2], 24.0, None)]  # padded batch count (5 > 3 frames) and no duration
    for count, idx, nfps, dur in cases:
        meta = VideoMetadata(total_num_frames=max(idx) + 1, fps=nfps, duration=dur, frames_indices=idx)
        ours = video_prompt(count, [i / nfps for i in idx], dur, S)
        assert ours == ref_prompt(count, meta)


def test_longest_edge_size_vs_reference():
    sizes = [(61, 97), (97, 61), (1, 1), (10, 4000), (4000, 10), (480, 640), (1104, 1600), (1536, 769), (333, 333)]
    for (h, w) in sizes:
        for L in (384, 1536, 2048, 5000):
            ref = tf_video.get_resize_output_image_size(torch.zeros(1, 3, h, w), resolution_max_side=L)
            assert longest_edge_size(h, w, L) == tuple(ref), (h, w, L)


@pytest.mark.parametrize("L, M, size", [(1536, 384, (97, 61)), (2048, 512, (61, 97)), (384, 384, (64, 48))])
def test_pixel_values_vs_pil_image_processor(tmp_path, L, M, size):
    w, h = size
    path = encode_video(tmp_path / "clip.avi", num_frames=12, fps=4, width=w, height=h)
    ours_v = load_video(path, num_frames=2)
    frames, _ = read_video_pyav(str(path), lambda metadata, **kw: np.array(ours_v.indices))
    ref = SmolVLMImageProcessorPil(do_image_splitting=False, size={"longest_edge": L}, max_image_size={"longest_edge": M})
    out = ref([list(frames)], return_tensors="np")
    ref_px = out["pixel_values"][0]  # (T, 3, M, M)
    ours = preprocess_frames(ours_v.frames, longest_edge=L, tile_size=M, mean=[0.5] * 3, std=[0.5] * 3,
                             rescale_factor=0.00392156862745098)
    assert ours.shape == ref_px.shape == (2, 3, M, M) and ours.dtype == np.float32
    assert (out["pixel_attention_mask"][0] == 1).all()  # frames fill the tile: the mask is all ones
    # Resampled uint8 values identical; floats within a few ulps (different rescale arithmetic).
    np.testing.assert_array_equal(np.rint(ours * 127.5 + 127.5), np.rint(ref_px * 127.5 + 127.5))
    np.testing.assert_allclose(ours, ref_px, rtol=0, atol=1e-7)
    # and exactly the 5.23 video processor's fused normalize (torchvision normalize = sub_, div_)
    u8 = torch.from_numpy(np.rint(ref_px * 127.5 + 127.5).astype(np.uint8))
    mean = torch.tensor([0.5] * 3) * (1.0 / 0.00392156862745098)
    fused = (u8.to(torch.float32) - mean[:, None, None]) / mean[:, None, None]
    np.testing.assert_array_equal(ours, fused.numpy())


def _chat(video_first: bool):
    content = [{"type": "video", "path": "clip.mp4"}, {"type": "text", "text": "Describe this video in detail"}]
    if not video_first:
        content = content[::-1]
    return [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": content},
            {"role": "assistant", "content": [{"type": "text", "text": "A square moves."}]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]


def test_chat_template_and_input_ids(tmp_path, ref2b):
    assert DEFAULT_VIDEO_CHAT_TEMPLATE == tf_proc.DEFAULT_CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(str(ref2b))
    from tokenizers import Tokenizer

    ours_tok = Tokenizer.from_file(str(ref2b / "tokenizer.json"))
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    path = encode_video(tmp_path / "nine.avi", num_frames=93, fps=10, width=32, height=24)
    v = load_video(path)
    for video_first in (True, False):
        msgs = _chat(video_first)
        ref_text = tok.apply_chat_template(msgs, chat_template=tf_proc.DEFAULT_CHAT_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
        ours_text = env.from_string(DEFAULT_VIDEO_CHAT_TEMPLATE).render(messages=msgs, add_generation_prompt=True)
        assert ours_text == ref_text and ours_text.count("<video>") == 1
        meta = VideoMetadata(total_num_frames=v.total_frames, fps=v.native_fps, duration=v.duration,
                             frames_indices=v.indices)
        stub = SimpleNamespace(all_special_multimodal_tokens=["<image>", "<video>"], image_token="<image>",
                               video_token="<video>")
        ref_full = ProcessorMixin.get_text_with_replacements(stub, [ref_text], [], [ref_prompt(len(v.indices), meta)])[0][0]
        ours_full = ours_text.replace("<video>", video_prompt(len(v.indices), v.timestamps, v.duration, S))
        assert ours_full == ref_full
        assert "nine frames from a 0:00:09" in ours_full
        ref_ids = tok(ref_full)["input_ids"]
        assert ours_tok.encode(ours_full).ids == ref_ids
        assert ref_ids.count(49190) == 9 * S + 1  # 9 frames x S image tokens + the image item's placeholder
