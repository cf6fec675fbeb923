"""SmolVLM2 video input: frame sampling, loading, frame preprocessing and the video prompt.

Which reference, and why: **transformers 5.23** (the project's oracle), i.e.
``SmolVLMVideoProcessor.sample_frames`` (frame-index policy), ``video_utils.read_video_pyav``
(decoding and metadata, see ``video_decode.py``), ``SmolVLMProcessor.replace_video_token`` (the
text that replaces ``<video>``; the video chat template is ``chat.DEFAULT_VIDEO_CHAT_TEMPLATE``).
Frame preprocessing follows the 5.23 video processor's geometry and arithmetic:

1. RGB (``image_io.to_rgb``: alpha composited over white, as the 5.23 ``convert_to_rgb``; 16-bit
   grey frames scaled to 8 bits),
2. resize so the longest edge is ``min(longest_edge, 4096)`` with the short side truncated and
   rounded up to even (5.23 ``video_processing_smolvlm.get_resize_output_image_size``; the rule
   is ``image.scale_to_longest_edge``).
   Hazard (SPEC 4.1): the 5.23 processor built from a ``preprocessor_config.json`` uses
   ``size.longest_edge`` (2048 / 1536), not ``video_sampling.video_size``: pass ``size``'s value,
3. resize to ``tile_size x tile_size`` (frames are never split),
4. fused rescale + normalize ``(float32(u8) - mean/r) / (std/r)`` in float32, ``r`` the rescale
   factor (5.23 ``TorchvisionBackend.rescale_and_normalize``).

Resampling is Pillow LANCZOS on uint8, both resizes. The 5.23 video processor asks for LANCZOS
and gets it only from torchvision >= 0.27 on CPU (BICUBIC otherwise); it cannot run at all
without torchvision, which this project does not install. Pillow LANCZOS is the filter requested,
the one transformers 4.50 (first SmolVLM2 release) applied to video frames through the image
processor, and what the runnable 5.23 PIL image processor computes for the same geometry, which
is the pixel oracle of our parity tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from datetime import timedelta
from pathlib import Path

import numpy as np
from PIL import Image

from smolvlm.processing.image import MAX_IMAGE_SIZE, pad_arrays, scale_to_longest_edge
from smolvlm.processing.image_io import to_rgb
from smolvlm.processing.prompt import ImageTokens, image_prompt_string
from smolvlm.processing.video_decode import (
    VideoError,
    VideoNotFoundError,
    check_frame_size,
    decode_frames,
    probe,
)

__all__ = [
    "VideoError",
    "VideoFrames",
    "VideoNotFoundError",
    "load_video",
    "pad_videos",
    "preprocess_frames",
    "sample_frame_indices",
    "video_prompt",
]

# SmolVLM2 checkpoint defaults (preprocessor_config.json video_sampling: fps 1, max_frames 64).
DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 64
# transformers' prompt code assumes 24 fps when frames come without metadata.
FRAME_LIST_FPS = 24.0


@dataclass
class VideoFrames:
    """Sampled frames plus the metadata the prompt needs.

    ``frames``: ``(T, H, W, 3)`` uint8 array (decoded files, arrays) or a list of RGB PIL images
    (image inputs). ``timestamps[i] = indices[i] / native_fps`` seconds. ``duration``: for files
    ``total_frames / native_fps``; for frame sequences (no metadata) the last timestamp, which is
    what the reference prompt falls back to.
    """

    frames: np.ndarray | list[Image.Image]
    timestamps: list[float]
    indices: list[int]
    duration: float
    native_fps: float
    total_frames: int


def sample_frame_indices(
    total_frames: int,
    native_fps: float,
    duration: float,
    *,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    num_frames: int | None = None,
    skip_secs: float = 1.0,
) -> np.ndarray:
    """Indices of the frames to keep, ascending and unique.

    Default policy = transformers 5.23 ``SmolVLMVideoProcessor.sample_frames`` (SPEC 4.1 steps
    2-4; its ``num_frames`` argument is our ``max_frames``): ``round(fps * duration)`` frames, at
    most ``max_frames``, at least 1, evenly spaced (``linspace`` truncated, then ``unique``) over
    the whole video, or from frame ``int(skip_secs * native_fps)`` to
    ``int(total_frames - skip_secs * native_fps)`` when ``duration - 2 * skip_secs > max_frames * fps``
    (the reference compares with ``max_frames * fps``, not ``max_frames / fps``; kept as is).
    ``num_frames=N``: N evenly spaced frames over the whole video, first and last included (the
    same linspace with no skip; fewer than N if the video has fewer frames).
    """
    if isinstance(total_frames, bool) or not isinstance(total_frames, (int, np.integer)) or total_frames < 1:
        raise VideoError(f"total_frames must be a positive integer, got {total_frames!r}")
    if not (math.isfinite(native_fps) and native_fps > 0):
        raise VideoError(f"native_fps must be a positive number, got {native_fps!r}")
    if not (math.isfinite(duration) and duration >= 0):
        raise VideoError(f"duration must be a non-negative number of seconds, got {duration!r}")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
            raise VideoError(f"num_frames must be a positive integer, got {num_frames!r}")
        return np.unique(np.linspace(0, total_frames - 1, int(num_frames), dtype=int))
    if not (math.isfinite(fps) and fps > 0):
        raise VideoError(f"fps must be a positive number, got {fps!r}")
    if isinstance(max_frames, bool) or not isinstance(max_frames, (int, np.integer)) or max_frames < 1:
        raise VideoError(f"max_frames must be a positive integer, got {max_frames!r}")
    desired = max(1, min(int(round(fps * duration)), int(max_frames)))
    start, end = 0, total_frames - 1
    if skip_secs > 0 and duration - 2 * skip_secs > max_frames * fps:
        start = int(skip_secs * native_fps)
        end = int(total_frames - skip_secs * native_fps)
    start, end = max(0, start), min(end, total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, desired, dtype=int))


def _open_image(path: Path) -> Image.Image:
    if not path.is_file():
        raise VideoNotFoundError(f"frame image not found: {path}")
    try:
        img = Image.open(path)
        check_frame_size(img.height, img.width, str(path))
        img.load()
    except VideoError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise VideoError(f"cannot read frame image {path}: {e}") from e
    return to_rgb(img)


def _sequence_indices(n: int, fps, max_frames, num_frames) -> list[int]:
    if fps is not None or max_frames is not None:
        raise VideoError(
            "fps/max_frames sampling needs the native frame rate, which a frame sequence does not "
            "carry (transformers raises here too); pass num_frames=N or pre-sampled frames"
        )
    if num_frames is None:
        return list(range(n))
    total_dur = (n - 1) / FRAME_LIST_FPS
    return sample_frame_indices(n, FRAME_LIST_FPS, total_dur, num_frames=num_frames).tolist()


def _load_sequence(source, fps, max_frames, num_frames) -> VideoFrames:
    """Frames given in memory or as image files: no metadata, so the reference's 24 fps is assumed."""
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[-1] != 3 or source.dtype != np.uint8:
            raise VideoError(f"a video array must be (T, H, W, 3) uint8, got {source.shape} {source.dtype}")
        if source.shape[0] == 0:
            raise VideoError("the video array has no frames")
        check_frame_size(source.shape[1], source.shape[2], "video array")
        idx = _sequence_indices(source.shape[0], fps, max_frames, num_frames)
        frames = source[idx]
    else:
        items = list(source)
        if not items:
            raise VideoError("the frame list is empty")
        idx = _sequence_indices(len(items), fps, max_frames, num_frames)
        frames = []
        for i in idx:
            item = items[i]
            if isinstance(item, (str, Path)):
                frames.append(_open_image(Path(item)))
            elif isinstance(item, Image.Image):
                check_frame_size(item.height, item.width, f"frame {i}")
                frames.append(to_rgb(item))
            else:
                raise VideoError(f"frame {i}: expected an image path or a PIL image, got {type(item).__name__}")
    stamps = [i / FRAME_LIST_FPS for i in idx]
    return VideoFrames(frames, stamps, idx, stamps[-1], FRAME_LIST_FPS, len(source))


def load_video(
    source,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    num_frames: int | None = None,
    skip_secs: float = 1.0,
) -> VideoFrames:
    """Decode and sample a video.

    ``source``: a video file path (str/Path; anything FFmpeg reads: mp4, webm, mkv, avi, gif...),
    a list of image paths, a list of PIL images, or a ``(T, H, W, 3)`` uint8 array.
    Files: SmolVLM2 sampling with ``fps`` (default 1) and ``max_frames`` (default 64), or exactly
    ``num_frames`` evenly spaced frames; only the selected frames are kept in memory.
    Frame sequences carry no frame rate: all frames by default (24 fps assumed for timestamps, as
    transformers does), or ``num_frames`` evenly spaced; ``fps``/``max_frames`` raise.
    """
    if num_frames is not None and (fps is not None or max_frames is not None):
        raise VideoError("num_frames and fps/max_frames are mutually exclusive: pass one sampling policy")
    if not isinstance(source, (str, Path)):
        if isinstance(source, np.ndarray) or isinstance(source, Sequence):
            return _load_sequence(source, fps, max_frames, num_frames)
        raise VideoError(f"unsupported video source type {type(source).__name__}")
    if str(source).startswith(("http://", "https://")):
        raise VideoError(f"remote videos are not fetched ({source}): download the file and pass its path")
    info = probe(source)
    indices = sample_frame_indices(
        info.total_frames,
        info.native_fps,
        info.duration,
        fps=DEFAULT_FPS if fps is None else fps,
        max_frames=DEFAULT_MAX_FRAMES if max_frames is None else max_frames,
        num_frames=num_frames,
        skip_secs=skip_secs,
    ).tolist()
    frames = decode_frames(source, indices, info)
    if isinstance(frames, list):  # frame size changed mid-stream
        frames = [Image.fromarray(f) for f in frames]
    stamps = [i / info.native_fps for i in indices]
    return VideoFrames(frames, stamps, indices, info.duration, info.native_fps, info.total_frames)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """(h, w) after the longest-edge resize of 5.23 ``video_processing_smolvlm.get_resize_output_image_size``
    (the 4096 cap applies to the target side, before the even rounding; images cap after it)."""
    return scale_to_longest_edge(height, width, min(MAX_IMAGE_SIZE, longest_edge))


def _frame_images(frames) -> list[Image.Image]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise VideoError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
        frames = list(frames)
    images = []
    for i, f in enumerate(frames):
        if isinstance(f, np.ndarray):
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
                raise VideoError(f"frame {i} must be (H, W, 3) uint8, got {f.shape} {f.dtype}")
            f = Image.fromarray(f)
        elif not isinstance(f, Image.Image):
            raise VideoError(f"frame {i}: expected a PIL image or an array, got {type(f).__name__}")
        check_frame_size(f.height, f.width, f"frame {i}")
        images.append(to_rgb(f))
    if not images:
        raise VideoError("no frames to preprocess")
    return images


def preprocess_frames(
    frames,
    *,
    longest_edge: int,
    tile_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    rescale_factor: float,
) -> np.ndarray:
    """Frames -> ``(T, 3, M, M)`` float32 pixel values, ``M = tile_size`` (module docstring steps 1-4).

    Every frame fills the whole ``M x M`` array, so its pixel mask is all ones (see ``pad_videos``).
    """
    if longest_edge < 1 or tile_size < 1 or rescale_factor <= 0:
        raise VideoError(f"bad sizes: longest_edge={longest_edge}, tile_size={tile_size}, rescale_factor={rescale_factor}")
    # Fused constants as 5.23 computes them: float32 mean/std times 1/rescale_factor, in float32.
    scale = np.float32(1.0 / rescale_factor)
    mean32 = (np.asarray(mean, np.float32) * scale).reshape(3, 1, 1)
    std32 = (np.asarray(std, np.float32) * scale).reshape(3, 1, 1)
    out = np.empty((len(frames), 3, tile_size, tile_size), np.float32)  # (T, 3, M, M)
    for t, img in enumerate(_frame_images(frames)):
        h, w = longest_edge_size(img.height, img.width, longest_edge)
        img = img.resize((w, h), Image.LANCZOS).resize((tile_size, tile_size), Image.LANCZOS)
        chw = np.asarray(img, np.float32).transpose(2, 0, 1)  # (3, M, M)
        out[t] = (chw - mean32) / std32
    return out


def pad_videos(videos: Sequence[np.ndarray], pixel_dtype: Any = None) -> tuple[Any, Any]:
    """Batch ``(T_b, 3, M, M)`` videos -> pixel_values ``(B, T_max, 3, M, M)`` float32 and
    pixel_attention_mask ``(B, T_max, M, M)`` int64; missing frames are zeros with a zero mask
    (5.23 ``SmolVLMVideoProcessor.pad``). ``pixel_dtype``: torch tensors in that dtype + bool, as
    ``image.pad_arrays``."""
    if not videos:
        raise VideoError("no videos to batch")
    m = videos[0].shape[-1]
    for b, v in enumerate(videos):
        if v.shape[1:] != (3, m, m):
            raise VideoError(f"video {b} has frame shape {v.shape[1:]}, expected (3, {m}, {m})")
    return pad_arrays([list(v) for v in videos], pixel_dtype=pixel_dtype)  # (B, T_max, 3, M, M), (B, T_max, M, M)


def video_prompt(num_frames_word: int, timestamps: list[float], duration: float | None, image_seq_len: int,
                 tokens: ImageTokens = ImageTokens()) -> str:
    """The text that replaces one ``<video>`` (5.23 ``SmolVLMProcessor.replace_video_token``).

    ``num_frames_word``: the count written in words, which transformers takes from the padded
    batch (``pixel_values.shape[1]``), not from this video. ``duration`` None -> the last timestamp.
    Each frame is an unsplit image block (``prompt.image_prompt_string(0, 0, ...)``).
    """
    from num2words import num2words  # imported on use: ~50 ms, only video prompts need it

    if not timestamps:
        raise VideoError("a video prompt needs at least one frame timestamp")
    seconds = int(duration) if duration is not None else int(timestamps[-1])
    text = (
        f"You are provided the following series of {num2words(num_frames_word)} frames "
        f"from a {timedelta(seconds=seconds)} [H:MM:SS] video.\n"
    )
    block = image_prompt_string(0, 0, image_seq_len, tokens)
    for t in timestamps:
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:" + block
    return text + "\n\n"
