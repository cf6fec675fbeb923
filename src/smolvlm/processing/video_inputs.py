"""Video inputs of ``SmolVLMProcessor``: sampling settings, video nesting, ``<video>`` expansion.

Video (SPEC §4.1; 5.23 ``SmolVLMProcessor`` + ``SmolVLMVideoProcessor``, which cannot run without
torchvision): each ``<video>`` marker takes one video, sampled (``video.py``), its frames
preprocessed as unsplit ``M x M`` images from the checkpoint's ``size.longest_edge`` (5.23 uses
``size``, not ``video_sampling.video_size``; SPEC §4.1 hazard), and the marker replaced by the
5.23 ``replace_video_token`` text, whose frame-count word is the largest frame count of any video
in the call (5.23: ``pixel_values.shape[1]`` of the padded video batch). Differences, on purpose:

* Sampling always happens: ``fps`` / ``max_frames`` default to the checkpoint's
  ``video_sampling`` (what 5.23's ``apply_chat_template(tokenize=True)`` passes); 5.23's plain
  ``__call__`` decodes every frame unless ``do_sample_frames=True``. ``num_frames=N`` means exactly
  N evenly spaced frames (5.23's SmolVLM sampler reads ``num_frames`` as the ``max_frames`` cap).
  In-memory frames (lists, arrays) carry no frame rate: all are kept unless ``num_frames`` is given.
* ``pixel_values`` has one row per *prompt* (B, N, 3, M, M): the sample's image tiles and video
  frames concatenated in placeholder order, zero-padded to the longest sample. 5.23's video
  processor returns one row per *video*, and with images and videos in one call its video
  ``pixel_values`` overwrite the image ones (the model then fails on the token/feature count).
  For one video per prompt the two layouts are identical; otherwise the non-padding frames are
  the same tensors in the same order, which is all the model reads (padding arrays are dropped).
* Padding frames get ``pixel_attention_mask`` 0, as padding images do; 5.23's
  ``SmolVLMVideoProcessor.pad`` marks them 1. The model never reads it (all-zero arrays are dropped).
* A ``<video>`` marker without a video raises (as 5.23's SmolVLMProcessor; its Idefics3Processor
  would tokenize the marker as text).
* SmolVLM v1 checkpoints (``Idefics3Processor``, no ``video_sampling``) take videos too, with
  fps 1 / at most 64 frames and the SmolVLM2 layout (5.23's Idefics3Processor has no video
  support; its chat template silently drops video items, ours renders them as ``<video>``).

``video.py`` (and PyAV behind it) is imported lazily, so importing the processor stays cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from smolvlm.processing.errors import PromptError
from smolvlm.processing.image import ImageProcessorConfig, pad_arrays
from smolvlm.processing.prompt import ImageTokens, image_prompt_string

if TYPE_CHECKING:
    from smolvlm.processing.processor import SmolVLMProcessor

VIDEO_TOKEN = "<video>"  # text placeholder, not a vocabulary token (SPEC §3.5)


@dataclass(frozen=True)
class VideoSampling:
    """``preprocessor_config.json`` ``video_sampling`` (SmolVLM2): target frame rate and frame cap.

    ``video_size`` is ignored on purpose: 5.23 overwrites it with ``size`` (SPEC §4.1 hazard).
    Checkpoints without the block (SmolVLM v1) get the SmolVLM2 values, fps 1 and 64 frames.
    """

    fps: float = 1.0
    max_frames: int = 64
    from_checkpoint: bool = False

    @classmethod
    def from_dict(cls, d: Any) -> "VideoSampling":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"preprocessor_config.json: video_sampling must be an object, got {d!r}")
        fps, mx = d.get("fps", cls.fps), d.get("max_frames", cls.max_frames)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"preprocessor_config.json: video_sampling.fps must be a positive number, got {fps!r}")
        if isinstance(mx, bool) or not isinstance(mx, int) or mx < 1:
            raise ValueError(f"preprocessor_config.json: video_sampling.max_frames must be a positive integer, got {mx!r}")
        return cls(float(fps), mx, True)


def _is_frame(x: Any) -> bool:
    return isinstance(x, Image.Image) or (isinstance(x, np.ndarray) and x.ndim == 3)


def _is_video(x: Any) -> bool:
    """One video on its own: a path, preloaded frames, a (T, H, W, 3) array or a list of frames."""
    from smolvlm.processing.video import VideoFrames

    if isinstance(x, (str, Path, VideoFrames)) or (isinstance(x, np.ndarray) and x.ndim == 4):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_frame(f) for f in x)


def nest_videos(videos: Any, texts: list[str] | None) -> list[list[Any]]:
    """One video, a flat list (split over the prompts by ``<video>`` count), or one list per prompt.

    A video is a path, a ``VideoFrames``, a ``(T, H, W, 3)`` array or a list of frames (PIL
    images / ``(H, W, 3)`` arrays); inside a per-prompt list a list of image paths is one video too.
    """
    if _is_video(videos):
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise PromptError(f"videos must be a video, a list of videos or one list per prompt, got {type(videos).__name__}")
    videos = list(videos)
    if videos and all(isinstance(x, (list, tuple)) and not _is_video(x) for x in videos):
        return [list(x) for x in videos]
    bad = [i for i, x in enumerate(videos) if not _is_video(x)]
    if bad:
        raise PromptError(f"videos[{bad[0]}] is not a video (a path, VideoFrames, (T, H, W, 3) array or list of frames)")
    if texts is None or len(texts) == 1:
        return [videos]
    counts = [t.count(VIDEO_TOKEN) for t in texts]
    if sum(counts) != len(videos):
        raise PromptError(f"the prompts hold {sum(counts)} {VIDEO_TOKEN} marker(s) in total {counts} but "
                          f"{len(videos)} video(s) were given")
    starts = np.cumsum([0, *counts])
    return [videos[starts[i]:starts[i + 1]] for i in range(len(texts))]


def check_video_markers(texts: list[str], videos: list[list[Any]] | None) -> None:
    """Each prompt holds exactly as many ``<video>`` markers as it was given videos (none if None)."""
    counts = [len(v) for v in videos] if videos is not None else [0] * len(texts)
    if len(counts) != len(texts):
        raise PromptError(f"got {len(texts)} prompt(s) but videos for {len(counts)} prompt(s); "
                          "pass one list of videos per prompt")
    for i, (t, n) in enumerate(zip(texts, counts)):
        if t.count(VIDEO_TOKEN) != n:
            shown = t if len(t) <= 80 else t[:77] + "..."
            raise PromptError(f"prompt {i} has {t.count(VIDEO_TOKEN)} {VIDEO_TOKEN} marker(s) but {n} video(s) "
                              f"were given for it (prompt {i}: {shown!r})")


def load_video_input(source: Any, sampling: VideoSampling, *, num_frames: int | None = None,
                     fps: float | None = None, max_frames: int | None = None) -> Any:
    """One video -> ``VideoFrames``; ``SmolVLMProcessor.load_video`` with the checkpoint's ``sampling``."""
    from smolvlm.processing.video import VideoError, VideoFrames, load_video

    if isinstance(source, VideoFrames):
        if len(source.frames) == 0 or len(source.timestamps) != len(source.frames):
            raise VideoError(f"VideoFrames holds {len(source.frames)} frames and {len(source.timestamps)} "
                             "timestamps; need one timestamp per frame and at least one frame")
        return source
    if isinstance(source, (str, Path)) and num_frames is None:
        fps = sampling.fps if fps is None else fps
        max_frames = sampling.max_frames if max_frames is None else max_frames
    return load_video(source, fps=fps, max_frames=max_frames, num_frames=num_frames)


def video_pixels(config: ImageProcessorConfig, frames: Any) -> np.ndarray:
    """``VideoFrames`` -> ``(T, 3, M, M)`` float32: unsplit frames resized from ``size.longest_edge``."""
    from smolvlm.processing.video import preprocess_frames

    return preprocess_frames(frames.frames, longest_edge=config.longest_edge, tile_size=config.max_image_size,
                             mean=config.image_mean, std=config.image_std, rescale_factor=config.rescale_factor)


def video_string(frames: Any, num_frames_word: int, image_seq_len: int, tokens: ImageTokens) -> str:
    """Text that replaces one ``<video>`` (5.23 ``SmolVLMProcessor.replace_video_token``)."""
    from smolvlm.processing.video import FAKE_TOKEN, GLOBAL_IMG_TOKEN, IMAGE_TOKEN, video_prompt

    text = video_prompt(num_frames_word, list(frames.timestamps), frames.duration, image_seq_len)
    if (tokens.image, tokens.fake, tokens.global_img) != (IMAGE_TOKEN, FAKE_TOKEN, GLOBAL_IMG_TOKEN):
        # a tokenizer_config that renames the image tokens (5.23 reads them from the tokenizer)
        block = FAKE_TOKEN + GLOBAL_IMG_TOKEN + IMAGE_TOKEN * image_seq_len + FAKE_TOKEN
        text = text.replace(block, image_prompt_string(0, 0, image_seq_len, tokens))
    return text


def expand_videos(proc: "SmolVLMProcessor", texts: list[str] | None, images: list[list[Any]] | None,
                  videos: list[list[Any]], do_image_splitting: bool | None,
                  sampling: dict[str, Any]) -> tuple[list[str] | None, dict[str, np.ndarray]]:
    """Prompts with ``<video>`` (and maybe ``<image>``) markers -> expanded prompts + one media row per prompt.

    Videos go through ``proc.load_video`` / ``video_pixels`` / ``video_string``, images through
    ``proc.image_processor`` and ``proc.image_string``. Without text the prompts are None and the
    media are one row per video, as 5.23's video processor.
    """
    from smolvlm.processing.video import pad_videos

    if texts is not None:
        check_video_markers(texts, videos)
    loaded = [[proc.load_video(v, **sampling) for v in sample] for sample in videos]
    pixels = [[proc.video_pixels(f) for f in sample] for sample in loaded]
    flat = [p for sample in pixels for p in sample]
    if not flat:
        raise PromptError("no videos in the batch")
    if texts is None:
        if images is not None:
            raise PromptError("images and videos together need text with <image>/<video> markers to order them")
        pv, mask = pad_videos(flat)  # (V, T_max, 3, M, M): one row per video, as 5.23's video processor
        return None, {"pixel_values": pv, "pixel_attention_mask": mask}
    word = max(p.shape[0] for p in flat)  # 5.23: pixel_values.shape[1] of the padded video batch
    pattern = re.compile(f"{re.escape(proc.image_tokens.image)}|{re.escape(VIDEO_TOKEN)}")
    expanded, media = [], []
    for i, t in enumerate(texts):
        imgs = iter(images[i] if images else [])
        vids = iter(zip(loaded[i], pixels[i]))
        arrays: list[np.ndarray] = []

        def replace(m: re.Match) -> str:
            if m.group() == VIDEO_TOKEN:
                frames, px = next(vids)
                arrays.extend(px)  # (3, M, M) each
                return proc.video_string(frames, word)
            parts, lay = proc.image_processor.split(next(imgs), do_image_splitting)
            arrays.extend(proc.image_processor.normalize(p) for p in parts)
            return proc.image_string(lay)

        expanded.append(pattern.sub(replace, t))  # one left-to-right pass, like 5.23
        media.append(arrays)
    if not any(media):  # cannot happen (markers were checked), kept for a clear message
        raise PromptError("no image or video arrays were produced")
    pv, mask = pad_arrays(media)  # (B, N, 3, H, W), (B, N, H, W)
    return expanded, {"pixel_values": pv, "pixel_attention_mask": mask}
