"""Processor video parity: ``SmolVLMProcessor(text, videos=...)`` vs transformers **5.23**.

Oracle: 5.23 ``SmolVLMProcessor`` (``processing_smolvlm.py`` + ``ProcessorMixin.__call__`` /
``apply_chat_template``: ``<video>`` expansion by ``replace_video_token``, one-pass placeholder
replacement, tokenization, padding, chat template switch, media collection from messages), built by
hand from a tiny copy of shared/reference/SmolVLM2-2.2B-Instruct (L=96, M=24 instead of 1536/384, so
frames are cheap; ``video_sampling.video_size`` set to 24 to exercise the SPEC 4.1 hazard: 5.23 must
and we must use ``size``). 5.23's ``SmolVLMVideoProcessor`` cannot be built without torchvision
(not installable beside our torch), so it is replaced by ``_StubVideoProcessor``, made of the 5.23
pieces that run here, in 5.23's order:

* decoding + sampling: ``video_utils.load_video(backend="pyav")`` with
  ``SmolVLMVideoProcessor.sample_frames`` (called unbound) when ``do_sample_frames`` is set, as
  5.23's ``apply_chat_template(tokenize=True)`` sets it; in-memory frames get 5.23's
  ``make_batched_videos`` / ``make_batched_metadata`` (no fps -> the processor's 24 fps default);
* resize: the 5.23 PIL image processor ``SmolVLMImageProcessorPil`` with ``do_image_splitting=False``
  and the checkpoint's ``size`` / ``max_image_size`` (longest-edge resize, then M x M; Pillow
  LANCZOS, the filter 5.23 asks for, which its torchvision backend would give with torchvision >= 0.27
  on CPU), rescale/normalize switched off there and done as 5.23's video processor does it
  (``TorchvisionBackend.rescale_and_normalize`` called unbound: fused ``(u8 - 127.5) / 127.5``);
* padding: ``SmolVLMVideoProcessor.pad`` (called unbound).

Compared: prompt text, input_ids, attention_mask and pixel_attention_mask exactly; pixel_values
exactly too (``atol=0``): both sides resample the same uint8 frames with the same Pillow call and
apply the same two float32 operations. Where our layout differs on purpose (one ``pixel_values``
row per prompt, not per video; images and videos mixed), the real (non-padding) frames are compared
in placeholder order, and the image arrays against 5.23's image processor.
"""

from __future__ import annotations

import importlib
import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._video_fixtures import encode_video

from smolvlm.processing import chat
from smolvlm.processing.errors import PromptError
from smolvlm.processing.messages import collect_videos
from smolvlm.processing.processor import SmolVLMProcessor, VideoSampling
from smolvlm.processing.video import VideoError, load_video

from transformers import AutoImageProcessor, AutoTokenizer
from transformers.image_processing_backends import TorchvisionBackend
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.video_utils import VideoMetadata, make_batched_metadata, make_batched_videos
from transformers.video_utils import load_video as tf_load_video

# import_module: the lazy package hands out placeholders for modules whose backend (torchvision) is missing
tf_proc = importlib.import_module("transformers.models.smolvlm.processing_smolvlm")
tf_video = importlib.import_module("transformers.models.smolvlm.video_processing_smolvlm")


class _Backend:
    """``self`` for 5.23 ``TorchvisionBackend.rescale_and_normalize``: its own fusing, and torchvision's
    ``normalize`` (``tensor.sub_(mean).div_(std)`` per channel) written in torch."""

    _fuse_mean_std_and_rescale_factor = TorchvisionBackend._fuse_mean_std_and_rescale_factor

    @staticmethod
    def normalize(x, mean, std, inplace=False):
        return (x - mean[:, None, None]) / std[:, None, None]


class _StubVideoProcessor:
    """5.23 ``SmolVLMVideoProcessor`` rebuilt from its runnable pieces (module docstring)."""

    def __init__(self, pre: dict):
        # 5.23 __init__: num_frames/fps from video_sampling, and video_size overwritten by size
        vs = pre.get("video_sampling")
        self.num_frames, self.fps = (vs["max_frames"], vs["fps"]) if vs else (None, None)
        self.pil = SmolVLMImageProcessorPil(do_image_splitting=False, size=pre["size"],
                                            max_image_size=pre["max_image_size"], do_rescale=False, do_normalize=False)
        # tuples: 5.23 standardizes mean/std to tuples before this (its fusing is lru-cached)
        self.mean, self.std, self.rescale = tuple(pre["image_mean"]), tuple(pre["image_std"]), pre["rescale_factor"]
        self._backend = _Backend()

    def __call__(self, videos, do_sample_frames=False, num_frames=None, fps=None, video_metadata=None, **kw):
        videos = make_batched_videos(videos)
        if isinstance(videos[0], (str, Path)):
            fn = (partial(tf_video.SmolVLMVideoProcessor.sample_frames, self, num_frames=num_frames, fps=fps)
                  if do_sample_frames else None)
            loaded = [tf_load_video(str(v), backend="pyav", sample_indices_fn=fn) for v in videos]
            videos, metadata = [f for f, _ in loaded], [m for _, m in loaded]
        else:
            assert not do_sample_frames
            metadata = make_batched_metadata(videos, video_metadata)
        clips = []
        for frames in videos:
            u8 = self.pil([list(frames)], return_tensors="pt")["pixel_values"][0]  # (T, 3, M, M) resized u8 values
            assert u8.dtype == torch.uint8
            clips.append(TorchvisionBackend.rescale_and_normalize(self._backend, u8, True, self.rescale, True,
                                                                  self.mean, self.std))
        t_max = max(c.shape[0] for c in clips)
        padded = [tf_video.SmolVLMVideoProcessor.pad(None, c, padded_size=tuple(c.shape[-2:]), max_num_frames=t_max)
                  for c in clips]
        return {"pixel_values": torch.stack([p for p, _ in padded]),
                "pixel_attention_mask": torch.stack([m for _, m in padded]), "video_metadata": metadata}


class _RefSmolVLM2(tf_proc.SmolVLMProcessor):
    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def _ref_processor(d: Path) -> _RefSmolVLM2:
    pre = json.loads((d / "preprocessor_config.json").read_text())
    return _RefSmolVLM2(image_processor=AutoImageProcessor.from_pretrained(d), tokenizer=AutoTokenizer.from_pretrained(d),
                        video_processor=_StubVideoProcessor(pre),
                        image_seq_len=json.loads((d / "processor_config.json").read_text())["image_seq_len"],
                        chat_template=chat.load_chat_template(d))


def _tiny_copy(src: Path, dst: Path, m: int = 24, video_sampling: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "preprocessor_config.json").read_text())
    cfg["size"], cfg["max_image_size"] = {"longest_edge": 4 * m}, {"longest_edge": m}
    if video_sampling is not None:
        cfg["video_sampling"] = video_sampling
    (dst / "preprocessor_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def tiny(ref2b, tmp_path_factory):
    d = _tiny_copy(ref2b, tmp_path_factory.mktemp("v") / "tiny2b",
                   video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 24}})
    return SmolVLMProcessor.from_pretrained(d), _ref_processor(d)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "nine": encode_video(d / "nine.avi", num_frames=93, fps=10, width=32, height=24),  # 9.3 s -> 9 frames
        "four": encode_video(d / "four.mp4", num_frames=40, fps=10, width=20, height=36),  # 4 s -> 4 frames, portrait
        "long": encode_video(d / "long.avi", num_frames=160, fps=2, width=30, height=30),  # 80 s > 64 -> 64, skip 1 s
    }


def _as_ref_mask(mask: torch.Tensor) -> torch.Tensor:
    """Our mask as 5.23's video processor writes it: ``SmolVLMVideoProcessor.pad`` marks the all-zero
    padding *frames* as valid (mask 1); we mark them 0, like its image processor does for padding images.
    The model never reads those entries (all-zero arrays are dropped before the mask is used)."""
    mask = mask.clone()
    mask[~mask.flatten(2).any(-1)] = 1
    return mask


def assert_same(ours, ref) -> None:
    assert set(ours) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"}
    for k in ours:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape, k
        if k == "pixel_attention_mask":
            padding = ~ours[k].flatten(2).any(-1)  # (B, N) padding frames
            assert ours["pixel_values"][padding].abs().sum() == ref["pixel_values"][padding].abs().sum() == 0
            assert torch.equal(_as_ref_mask(ours[k]), ref[k]), k
        else:
            assert torch.equal(ours[k], ref[k]), k


def _real(pv: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-padding arrays of a batch in sample-major order: the model keeps arrays that are not all zero."""
    keep = pv.flatten(2).ne(0).any(-1).flatten()  # (B*N,)
    return pv.flatten(0, 1)[keep], mask.flatten(0, 1)[keep]


def test_single_video_default_sampling(tiny, clips):
    ours, ref = tiny
    for name, n_frames in (("nine", 9), ("four", 4), ("long", 64)):
        text = "<|im_start|>User: <video>What happens?<end_of_utterance>\nAssistant:"
        a = ours(text=text, videos=[str(clips[name])])
        b = ref(text=text, videos=[str(clips[name])], return_tensors="pt", do_sample_frames=True, num_frames=64, fps=1)
        assert_same(a, b)
        assert a["pixel_values"].shape == (1, n_frames, 3, 24, 24)
        prompt = ours.decode(a["input_ids"][0])
        assert prompt.count("Frame from") == n_frames
        assert (a["input_ids"] == ours.image_token_id).sum() == n_frames * 81
    assert "nine frames from a 0:00:09" in ours.decode(ours(text="<video>", videos=str(clips["nine"]))["input_ids"][0])


def test_sampling_overrides(tiny, clips):
    ours, ref = tiny
    a = ours(text="<video>q", videos=[str(clips["nine"])], fps=2.0, max_frames=5)
    b = ref(text="<video>q", videos=[str(clips["nine"])], return_tensors="pt", do_sample_frames=True, num_frames=5, fps=2.0)
    assert_same(a, b)
    assert a["pixel_values"].shape[1] == 5
    # num_frames = exactly N evenly spaced frames (ours); 5.23 has no such policy, so feed it the same frames
    vf = load_video(clips["long"], num_frames=3)
    a = ours(text="<video>q", videos=[str(clips["long"])], num_frames=3)
    meta = VideoMetadata(total_num_frames=vf.total_frames, fps=vf.native_fps, duration=vf.duration,
                         frames_indices=vf.indices)
    assert_same(a, ref(text="<video>q", videos=[vf.frames], video_metadata=[meta], return_tensors="pt"))
    assert vf.indices == [0, 79, 159]
    # a preloaded VideoFrames is used as given
    pre = ours(text="<video>q", videos=[vf])
    assert all(torch.equal(pre[k], a[k]) for k in a)


def test_batch_padding_and_frame_count_word(tiny, clips):
    """Two prompts, videos of 9 and 4 frames: both intros say "nine" (5.23: the padded batch's T)."""
    ours, ref = tiny
    texts = ["<|im_start|>User: <video>Long one?<end_of_utterance>\nAssistant:", "Short: <video> ok"]
    vids = [str(clips["nine"]), str(clips["four"])]
    for side in ("left", "right"):
        a = ours(text=texts, videos=vids, padding_side=side)
        b = ref(text=texts, videos=vids, return_tensors="pt", padding=True, padding_side=side,
                do_sample_frames=True, num_frames=64, fps=1)
        assert_same(a, b)
    assert all("series of nine frames" in ours.decode(row) for row in a["input_ids"])
    assert a["pixel_attention_mask"][1, 4:].sum() == 0 and a["pixel_values"][1, 4:].abs().sum() == 0
    nested = ours(text=texts, videos=[[vids[0]], [vids[1]]], padding_side="right")
    assert all(torch.equal(nested[k], a[k]) for k in a)  # one list per prompt == flat list


def test_two_videos_one_prompt(tiny, clips):
    """5.23 gives one pixel_values row per video; ours one row per prompt with the frames in order."""
    ours, ref = tiny
    text = "First <video> then <video> compare."
    vids = [str(clips["four"]), str(clips["nine"])]
    a = ours(text=text, videos=vids)
    b = ref(text=text, videos=vids, return_tensors="pt", do_sample_frames=True, num_frames=64, fps=1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert a["pixel_values"].shape == (1, 13, 3, 24, 24) and b["pixel_values"].shape == (2, 9, 3, 24, 24)
    for x, y in zip(_real(a["pixel_values"], a["pixel_attention_mask"]), _real(b["pixel_values"], b["pixel_attention_mask"])):
        assert torch.equal(x, y)
    assert ours.decode(a["input_ids"][0]).count("series of nine frames") == 2


def test_frames_in_memory(tiny, clips):
    """Arrays / PIL frame lists carry no metadata: all frames, 24 fps timestamps (5.23 default)."""
    ours, ref = tiny
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (30, 17, 29, 3), dtype=np.uint8)
    pil = [Image.fromarray(f) for f in rng.integers(0, 256, (5, 40, 12, 3), dtype=np.uint8)]
    for video in (arr, pil):
        a = ours(text="See <video>.", videos=[video])
        assert_same(a, ref(text="See <video>.", videos=[video], return_tensors="pt"))
    assert "Frame from 00:01:" in ours.decode(ours(text="<video>", videos=[arr])["input_ids"][0])  # frame 29 / 24 fps
    with pytest.raises(VideoError, match="native frame rate"):
        ours(text="<video>", videos=[arr], max_frames=4)


def test_images_and_videos_mixed(tiny, clips):
    """Not supported by 5.23 (its video pixel_values replace the image ones); its text expansion is."""
    ours, ref = tiny
    rng = np.random.default_rng(1)
    img1 = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))  # split: 3x4 tiles + global
    img2 = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    text = "<image>A picture, <video>a clip, <image>another picture."
    a = ours(text=text, images=[[img1, img2]], videos=[[str(clips["four"])]])
    b = ref(text=text, images=[[img1, img2]], videos=[str(clips["four"])], return_tensors="pt",
            do_sample_frames=True, num_frames=64, fps=1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    imgs = ref.image_processor([[img1, img2]], return_tensors="pt", return_row_col_info=True)
    n1 = imgs["rows"][0][0] * imgs["cols"][0][0] + 1
    assert n1 == 13
    ref_pv = torch.cat([imgs["pixel_values"][0, :n1], b["pixel_values"][0], imgs["pixel_values"][0, n1:]])
    ref_mask = torch.cat([imgs["pixel_attention_mask"][0, :n1], b["pixel_attention_mask"][0],
                          imgs["pixel_attention_mask"][0, n1:]])
    assert torch.equal(a["pixel_values"][0], ref_pv) and torch.equal(a["pixel_attention_mask"][0], ref_mask)
    # image tokens in the prompt == real arrays x S, which the model's merge requires
    assert (a["input_ids"] == ours.image_token_id).sum() == a["pixel_values"].shape[1] * 81


def _conv(clip_a: str, clip_b: str, image: Image.Image) -> list[dict]:
    return [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "video", "path": clip_a}, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "video", "path": clip_b},
                                     {"type": "image", "image": image}]},
    ]


def test_chat_template_and_tokenize(tiny, clips):
    ours, ref = tiny
    assert chat.DEFAULT_VIDEO_CHAT_TEMPLATE == tf_proc.DEFAULT_CHAT_TEMPLATE
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8))
    conv = _conv(str(clips["nine"]), str(clips["four"]), img)
    for gen in (True, False):
        text = ours.apply_chat_template(conv, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(conv, add_generation_prompt=gen)
    assert text.count("<video>") == 2 and text.count("<image>") == 1
    assert ours.collect_videos(conv) == [str(clips["nine"]), str(clips["four"])]
    # tokenize=True: 5.23 loads the videos from the messages and samples with video_sampling (fps 1, 64 frames);
    # mixing an image in is unsupported there, so the image-free conversation is compared in full ...
    conv_v = _conv(str(clips["nine"]), str(clips["four"]), img)
    conv_v[3]["content"] = conv_v[3]["content"][:2]
    want = ref.apply_chat_template(conv_v, tokenize=True, add_generation_prompt=True)
    assert ours.apply_chat_template(conv_v, tokenize=True) == want[0]
    # ... and with the image, ids equal 5.23's text expansion of the same rendered prompt
    ids = ours.apply_chat_template(conv, tokenize=True)
    b = ref(text=text + "Assistant:", images=[[img]], videos=[str(clips["nine"]), str(clips["four"])],
            do_sample_frames=True, num_frames=64, fps=1)
    assert ids == b["input_ids"][0]
    # batched conversations, frames given in the message (5.23 key "video")
    frames = load_video(clips["four"])
    convs = [[{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "?"}]}], conv_v]
    got = ours.apply_chat_template(convs, tokenize=True)
    assert got[1] == want[0] and len(got[0]) < len(got[1])


def test_v1_checkpoint_defaults(ref256, tmp_path):
    """SmolVLM v1 (Idefics3Processor, no video_sampling): fps 1 / 64 frames, SmolVLM2 layout with S=64.

    5.23's Idefics3Processor has no video path; the oracle is 5.23's SmolVLMProcessor built from the same
    256M files with the SmolVLM2 sampling defaults, i.e. what a SmolVLM2 checkpoint of that size does."""
    d = _tiny_copy(ref256, tmp_path / "tiny256", m=32)
    ours = SmolVLMProcessor.from_pretrained(d)
    assert ours.processor_class == "Idefics3Processor" and ours.video_sampling == VideoSampling()
    pre = json.loads((d / "preprocessor_config.json").read_text())
    pre["video_sampling"] = {"fps": 1, "max_frames": 64}
    ref = _RefSmolVLM2(image_processor=AutoImageProcessor.from_pretrained(d), tokenizer=AutoTokenizer.from_pretrained(d),
                       video_processor=_StubVideoProcessor(pre), image_seq_len=64, chat_template=chat.load_chat_template(d))
    clip = encode_video(tmp_path / "c.avi", num_frames=45, fps=10, width=40, height=30)
    conv = [{"role": "user", "content": [{"type": "video", "path": str(clip)}, {"type": "text", "text": "Describe."}]}]
    text = ours.apply_chat_template(conv)
    assert text == ref.apply_chat_template(conv, add_generation_prompt=True, chat_template=tf_proc.DEFAULT_CHAT_TEMPLATE)
    a = ours(text=text, videos=[str(clip)])
    assert_same(a, ref(text=text, videos=[str(clip)], return_tensors="pt", do_sample_frames=True, num_frames=64, fps=1))
    assert a["pixel_values"].shape == (1, 4, 3, 32, 32)


def test_errors(tiny, clips, tmp_path):
    ours, _ = tiny
    v = str(clips["four"])
    with pytest.raises(PromptError, match=r"prompt 0 has 1 <video> marker\(s\) but 2 video"):
        ours(text="<video>", videos=[[v, v]])
    with pytest.raises(PromptError, match=r"2 <video> marker\(s\) in total \[1, 1\] but 3 video"):
        ours(text=["<video>", "<video>"], videos=[v, v, v])
    with pytest.raises(PromptError, match="has 1 <video> marker.* but 0 video"):
        ours(text="<video> no video given")
    with pytest.raises(PromptError, match="is not a video"):
        ours(text="<video>", videos=[v, 3])
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(VideoError, match="bad.mp4"):
        ours(text="<video>", videos=[str(bad)])
    with pytest.raises(VideoError, match="not found"):
        ours(text="<video>", videos=[str(tmp_path / "missing.mp4")])
    with pytest.raises(VideoError, match="mutually exclusive"):
        ours(text="<video>", videos=[v], num_frames=2, fps=1.0)
    with pytest.raises(ValueError, match="video_sampling.max_frames"):
        VideoSampling.from_dict({"fps": 1, "max_frames": 0})
    with pytest.raises(chat.ChatError, match="video item"):
        collect_videos([{"role": "user", "content": [{"type": "video", "path": v}, {"type": "video"}]}])
