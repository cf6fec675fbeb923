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

Pure functions of the processor's settings (image processor, ``image_seq_len``, image tokens,
``VideoSampling``), passed in by ``SmolVLMProcessor``; nothing here calls back into the processor.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from smolvlm.processing.errors import PromptError
from smolvlm.processing.image import ImageProcessor, ImageProcessorConfig, TileBudget, pad_arrays
from smolvlm.processing.prompt import VIDEO_TOKEN, ImageTokens, Prompt, image_prompt_string, marker_mismatch
from smolvlm.processing.video import (
    DEFAULT_FPS,
    DEFAULT_MAX_FRAMES,
    VideoError,
    VideoFrames,
    load_video,
    pad_videos,
    preprocess_frames,
    video_prompt,
)


@dataclass(frozen=True)
class VideoSampling:
    """``preprocessor_config.json`` ``video_sampling`` (SmolVLM2): target frame rate and frame cap.

    ``video_size`` is ignored on purpose: 5.23 overwrites it with ``size`` (SPEC §4.1 hazard).
    Checkpoints without the block (SmolVLM v1) get the SmolVLM2 values, fps 1 and 64 frames.
    """

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
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
    if isinstance(x, (str, Path, VideoFrames)) or (isinstance(x, np.ndarray) and x.ndim == 4):
        return True
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(_is_frame(f) for f in x)


def nest_videos(videos: Any, texts: list[Prompt] | None) -> list[list[Any]]:
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
    counts = [Prompt.of(t).count(VIDEO_TOKEN) for t in texts]
    if sum(counts) != len(videos):
        raise PromptError(f"the prompts hold {sum(counts)} {VIDEO_TOKEN} marker(s) in total {counts} but "
                          f"{len(videos)} video(s) were given")
    starts = np.cumsum([0, *counts])
    return [videos[starts[i]:starts[i + 1]] for i in range(len(texts))]


def check_video_markers(texts: list[Prompt], videos: list[list[Any]] | None) -> None:
    """Each prompt holds exactly as many ``<video>`` markers as it was given videos (none if None)."""
    counts = [len(v) for v in videos] if videos is not None else [0] * len(texts)
    if len(counts) != len(texts):
        raise PromptError(f"got {len(texts)} prompt(s) but videos for {len(counts)} prompt(s); "
                          "pass one list of videos per prompt")
    for i, (t, n) in enumerate(zip(texts, counts)):
        n_markers = Prompt.of(t).count(VIDEO_TOKEN)
        if n_markers != n:
            raise marker_mismatch(i, t, VIDEO_TOKEN, n_markers, n, "video")


def load_video_input(source: Any, sampling: VideoSampling, *, num_frames: int | None = None,
                     fps: float | None = None, max_frames: int | None = None) -> Any:
    """One video -> ``VideoFrames``; ``SmolVLMProcessor.load_video`` with the checkpoint's ``sampling``."""
    if isinstance(source, VideoFrames):
        if len(source.frames) == 0 or len(source.timestamps) != len(source.frames):
            raise VideoError(f"VideoFrames holds {len(source.frames)} frames and {len(source.timestamps)} "
                             "timestamps; need one timestamp per frame and at least one frame")
        return source
    if isinstance(source, (str, Path)) and num_frames is None:
        fps = sampling.fps if fps is None else fps
        max_frames = sampling.max_frames if max_frames is None else max_frames
    return load_video(source, fps=fps, max_frames=max_frames, num_frames=num_frames)


def video_pixels(config: ImageProcessorConfig, frames: VideoFrames) -> np.ndarray:
    """``VideoFrames`` -> ``(T, 3, M, M)`` float32: unsplit frames resized from ``size.longest_edge``."""
    return preprocess_frames(frames.frames, longest_edge=config.longest_edge, tile_size=config.max_image_size,
                             mean=config.image_mean, std=config.image_std, rescale_factor=config.rescale_factor)


def video_string(frames: VideoFrames, num_frames_word: int, image_seq_len: int, tokens: ImageTokens) -> str:
    """Text that replaces one ``<video>`` (5.23 ``SmolVLMProcessor.replace_video_token``)."""
    return video_prompt(num_frames_word, list(frames.timestamps), frames.duration, image_seq_len, tokens)


def expand_videos(
    texts: list[Prompt] | None,
    images: list[list[Any]] | None,
    videos: list[list[Any]],
    *,
    image_processor: ImageProcessor,
    image_seq_len: int,
    tokens: ImageTokens,
    sampling: VideoSampling,
    do_image_splitting: bool | None = None,
    budget: TileBudget | None = None,
    load: dict[str, Any] | None = None,
    pixel_dtype: Any = None,
) -> tuple[list[Prompt] | None, dict[str, Any]]:
    """Prompts with ``<video>`` (and maybe ``<image>``) markers -> expanded prompts + one media row per prompt.

    Videos are loaded with ``sampling`` and ``load`` (``num_frames`` / ``fps`` / ``max_frames``), images
    split by ``image_processor``; markers are replaced in one left-to-right pass, as 5.23 does. Without
    text the prompts are None and the media are one row per video, as 5.23's video processor.
    ``pixel_dtype``: the media as torch tensors in that dtype with a bool mask (``image.pad_arrays``).
    """
    if texts is not None:
        check_video_markers(texts, videos)
    loaded = [[load_video_input(v, sampling, **(load or {})) for v in sample] for sample in videos]
    pixels = [[video_pixels(image_processor.config, f) for f in sample] for sample in loaded]
    flat = [p for sample in pixels for p in sample]
    if not flat:
        raise PromptError("no videos in the batch")
    if texts is None:
        if images is not None:
            raise PromptError("images and videos together need text with <image>/<video> markers to order them")
        pv, mask = pad_videos(flat, pixel_dtype)  # (V, T_max, 3, M, M): one row per video, as 5.23's video processor
        return None, {"pixel_values": pv, "pixel_attention_mask": mask}
    word = max(p.shape[0] for p in flat)  # 5.23: pixel_values.shape[1] of the padded video batch
    pattern = re.compile(f"{re.escape(tokens.image)}|{re.escape(VIDEO_TOKEN)}")
    expanded, media = [], []
    for i, t in enumerate(texts):
        imgs = iter(images[i] if images else [])
        vids = iter(zip(loaded[i], pixels[i]))
        arrays: list[np.ndarray] = []

        def replace(m: re.Match[str]) -> str:
            if m.group() == VIDEO_TOKEN:
                frames, px = next(vids)
                arrays.extend(px)  # (3, M, M) each
                return video_string(frames, word, image_seq_len, tokens)
            parts, lay = image_processor.split(next(imgs), do_image_splitting, budget)
            arrays.extend(image_processor.normalize(p) for p in parts)
            return image_prompt_string(lay.rows, lay.cols, image_seq_len, tokens)

        expanded.append(t.sub(pattern, replace))  # one left-to-right pass over the markup, like 5.23
        media.append(arrays)
    if not any(media):  # cannot happen (markers were checked), kept for a clear message
        raise PromptError("no image or video arrays were produced")
    pv, mask = pad_arrays(media, pixel_dtype=pixel_dtype)  # (B, N, 3, H, W), (B, N, H, W)
    return expanded, {"pixel_values": pv, "pixel_attention_mask": mask}
