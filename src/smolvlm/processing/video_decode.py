"""Video file decoding with PyAV: metadata probe and memory-bounded frame extraction.

Mirrors transformers 5.23 ``transformers.video_utils.read_video_pyav`` (the SmolVLM2 video path):

* ``total_frames`` = ``stream.frames`` (the container's frame count), ``native_fps`` =
  ``float(stream.average_rate)``, ``duration`` = ``total_frames / average_rate`` (exact rational,
  then float). For a variable-frame-rate file this is the *average* rate, so
  ``timestamp = index / native_fps`` is an approximation of the real presentation time: that is
  how the reference builds its ``MM:SS`` stamps, and we keep it.
* Frame ``i`` is the ``i``-th frame the decoder outputs (``enumerate(container.decode(...))``),
  converted with ``frame.to_ndarray(format="rgb24")``.

Deliberate deviations (each one is a case where the reference silently misbehaves):

* Matroska/WebM files carry no frame count (``stream.frames == 0``). transformers then sets
  ``total_num_frames = duration = 0`` and samples frame 0 only. We count the stream's non-empty
  packets instead (one packet per decoded frame for every codec FFmpeg muxes into these
  containers; tests check packets == decoded frames for each fixture format).
* A file whose decoder runs out before a selected index (truncated download, header frame count
  larger than the data) raises :class:`VideoError`; transformers returns fewer frames than indices.
* Unreadable, audio-only, zero-frame, unknown-codec and absurdly large inputs raise
  :class:`VideoError` with the reason instead of an FFmpeg or numpy error.

Memory: frames are streamed; only the selected indices are converted to RGB and kept. When the
selected indices are sparse, we seek to the keyframe before each target instead of decoding the
gap; the frame there is identified by its presentation timestamp against a packet table, so it is
still exactly the ``i``-th decoded frame (any inconsistency falls back to sequential decoding).
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import av

# PyAV (~150 ms to import) is imported by the functions that decode, so importing the processor
# stays cheap for image-only use.

# Per-frame size limits: larger frames are rejected before any pixel is decoded.
MAX_SIDE = 8192
MAX_PIXELS = 2**28
# Seek only when the selected frames are this sparse (average gap in frames) and the video this long.
SEEK_MIN_GAP = 48
SEEK_MIN_FRAMES = 256


class VideoError(ValueError):
    """A video (or frame sequence) cannot be loaded; the message names the file and the reason."""


class VideoNotFoundError(VideoError, FileNotFoundError):
    """The video file or one of the frame image files does not exist."""


@dataclass(frozen=True)
class StreamInfo:
    """What the reference's ``VideoMetadata`` holds for a PyAV-decoded file."""

    total_frames: int
    native_fps: float
    duration: float
    width: int
    height: int


def check_frame_size(height: int, width: int, what: str) -> None:
    """Reject frames beyond ``MAX_SIDE`` per side or ``MAX_PIXELS`` in total (and empty ones)."""
    if height < 1 or width < 1:
        raise VideoError(f"{what}: empty frame size {width}x{height}")
    if max(height, width) > MAX_SIDE or height * width > MAX_PIXELS:
        raise VideoError(
            f"{what}: frame size {width}x{height} exceeds the limit "
            f"({MAX_SIDE} px per side, {MAX_PIXELS} pixels per frame)"
        )


def _open(path: Path) -> av.container.InputContainer:
    import av

    if path.is_dir():
        raise VideoError(f"{path} is a directory, not a video file")
    if not path.is_file():
        raise VideoNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:  # InvalidDataError, EOFError, ...: not a readable media file
        raise VideoError(f"cannot open video {path}: {e} (truncated, corrupt or not a video file?)") from e
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        container.close()
        raise VideoError(f"{path} has no video stream (found: {', '.join(kinds)})")
    return container


def _video_packets(path: Path) -> list[av.Packet]:
    """Demux (no decoding) all non-empty packets of the first video stream."""
    import av

    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            return [p for p in container.demux(stream) if p.size > 0]
        except av.error.FFmpegError as e:
            raise VideoError(f"cannot read video {path}: {e} (truncated or corrupt?)") from e


def probe(path: str | Path) -> StreamInfo:
    """Frame count, average frame rate, duration and size of the first video stream."""
    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise VideoError(f"{path}: no decoder for this video codec (unsupported codec)")
        check_frame_size(stream.height, stream.width, str(path))
        rate = stream.average_rate or stream.guessed_rate
        total = stream.frames
    if rate is None or rate <= 0:
        raise VideoError(f"{path}: the video stream has no frame rate")
    if total <= 0:  # Matroska/WebM: no frame count in the header (see module docstring)
        total = len(_video_packets(path))
    if total <= 0:
        raise VideoError(f"{path}: the video stream has no frames")
    duration = Fraction(total) / Fraction(rate)
    return StreamInfo(total, float(rate), float(duration), stream.width, stream.height)


def _to_rgb(frame: av.VideoFrame, path: Path) -> np.ndarray:
    check_frame_size(frame.height, frame.width, str(path))
    return frame.to_ndarray(format="rgb24")  # (H, W, 3) uint8, the reference's conversion


def _decode_sequential(container, path: Path, wanted: list[int], total: int) -> dict[int, np.ndarray]:
    targets, last, out = set(wanted), max(wanted), {}
    n = 0
    for n, frame in enumerate(container.decode(container.streams.video[0]), start=1):
        if n - 1 in targets:
            out[n - 1] = _to_rgb(frame, path)
        if n - 1 >= last:
            break
    if len(out) < len(targets):
        missing = sorted(targets - out.keys())
        raise VideoError(
            f"{path}: decoding stopped after {n} frames but frame {missing[0]} was requested "
            f"(the header says {total} frames; truncated or corrupt file?)"
        )
    return out


class _SeekFailed(Exception):
    """The seek path met something it cannot map to frame indices; decode sequentially instead."""


def _decode_seeking(container, path: Path, wanted: list[int], packets: list[av.Packet]) -> dict[int, np.ndarray]:
    """Seek to the keyframe before each far-away target; frames are identified by their pts."""
    pts = [p.pts for p in packets]
    if any(t is None for t in pts) or len(set(pts)) != len(pts):
        raise _SeekFailed
    order = sorted(pts)  # presentation order == decoder output order
    index_of = {t: i for i, t in enumerate(order)}
    # (presentation index, seek timestamp) of each keyframe; seek on min(pts, dts) so that the
    # demuxer never lands after the keyframe (mp4 seeks on dts, Matroska on pts).
    keys = sorted((index_of[p.pts], min(p.pts, p.dts if p.dts is not None else p.pts)) for p in packets if p.is_keyframe)
    key_idx = [k for k, _ in keys]
    stream, out, cursor, frames = container.streams.video[0], {}, -1, None
    for target in wanted:
        k = bisect_right(key_idx, target) - 1
        if frames is None or (k >= 0 and key_idx[k] > cursor + 1):
            if k < 0:
                raise _SeekFailed
            container.seek(keys[k][1], stream=stream, backward=True, any_frame=False)
            frames = container.decode(stream)
        for frame in frames:
            idx = index_of.get(frame.pts)
            if idx is None:
                raise _SeekFailed
            cursor = idx
            if idx == target:
                out[idx] = _to_rgb(frame, path)
                break
            if idx > target:
                raise _SeekFailed
        else:
            raise _SeekFailed
    return out


def decode_frames(path: str | Path, indices: list[int], info: StreamInfo, *, seek: bool | None = None) -> np.ndarray | list[np.ndarray]:
    """Frames at ``indices`` (ascending, unique) as ``(T, H, W, 3)`` uint8.

    ``seek``: None = seek when the indices are sparse in a long video, True = try seeking,
    False = decode sequentially. A list of arrays is returned if the frame size changes mid-stream.
    """
    import av

    path = Path(path)
    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0 or wanted[-1] >= info.total_frames:
        raise VideoError(f"{path}: frame indices {wanted[:3]}... outside 0..{info.total_frames - 1}")
    if seek is None:
        seek = info.total_frames >= SEEK_MIN_FRAMES and info.total_frames >= SEEK_MIN_GAP * len(wanted)
    try:
        out = None
        if seek:
            packets = _video_packets(path)
            if len(packets) == info.total_frames:
                try:
                    with _open(path) as container:
                        out = _decode_seeking(container, path, wanted, packets)
                except _SeekFailed:
                    out = None
        if out is None:
            with _open(path) as container:
                out = _decode_sequential(container, path, wanted, info.total_frames)
    except av.error.FFmpegError as e:  # DecoderNotFoundError, InvalidDataError, ... while decoding
        raise VideoError(f"cannot decode video {path}: {e} (corrupt file or unsupported codec?)") from e
    frames = [out[i] for i in wanted]
    if len({f.shape for f in frames}) == 1:
        return np.stack(frames)  # (T, H, W, 3) uint8
    return frames
