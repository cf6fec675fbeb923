"""Synthetic test videos, encoded with PyAV into a test's ``tmp_path``.

Every file is tiny (tens of frames, <= 100 px) so the video tests stay fast on 2 shared cores.
Frames show a moving square and a frame-number-dependent colour, so a wrong frame index gives
different pixels (the decoded-frame tests rely on that).
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# (suffix, encoder, pix_fmt, needs even size): one entry per container format the tests cover.
# libx264 and the VP8/VP9 encoders reject odd sizes in yuv420p, mpeg4 and gif take any size.
FORMATS: dict[str, tuple[str, str, str, bool]] = {
    "mp4-mpeg4": (".mp4", "mpeg4", "yuv420p", False),
    "mp4-h264": (".mp4", "libx264", "yuv420p", True),
    "mkv-h264": (".mkv", "libx264", "yuv420p", True),
    "avi-mpeg4": (".avi", "mpeg4", "yuv420p", False),
    "webm-vp9": (".webm", "libvpx-vp9", "yuv420p", True),
    "webm-vp8": (".webm", "libvpx", "yuv420p", True),
    "gif": (".gif", "gif", "rgb8", False),
}


def synthetic_frame(i: int, width: int, height: int) -> np.ndarray:
    """Frame ``i``: gradient background whose colour depends on i, plus a moving white square."""
    y, x = np.mgrid[0:height, 0:width]
    frame = np.empty((height, width, 3), np.uint8)
    frame[..., 0] = (x * 255 // max(width - 1, 1) + 37 * i) % 256
    frame[..., 1] = (y * 255 // max(height - 1, 1)) % 256
    frame[..., 2] = (53 * i) % 256
    side = max(min(width, height) // 4, 1)
    x0 = (i * 7) % max(width - side, 1)
    y0 = (i * 3) % max(height - side, 1)
    frame[y0 : y0 + side, x0 : x0 + side] = 255
    return frame


def encode_video(
    path: Path,
    *,
    codec: str = "mpeg4",
    num_frames: int = 30,
    fps: int = 10,
    width: int = 97,
    height: int = 61,
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    pts_ms: list[int] | None = None,
) -> Path:
    """Encode ``num_frames`` synthetic frames; ``pts_ms`` (milliseconds) makes a variable-rate file."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if options:
            stream.options = options
        if pts_ms is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(i, width, height), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def encode_format(tmp_path: Path, name: str, *, num_frames: int = 30, fps: int = 10,
                  width: int = 97, height: int = 61, **kw) -> Path:
    """Encode a file of one of ``FORMATS``; odd sizes are rounded up for encoders that need even ones."""
    suffix, codec, pix_fmt, even = FORMATS[name]
    if even:
        width, height = width + width % 2, height + height % 2
    return encode_video(tmp_path / f"{name}{suffix}", codec=codec, num_frames=num_frames, fps=fps,
                        width=width, height=height, pix_fmt=pix_fmt, **kw)


def encode_audio_only(path: Path, seconds: float = 0.5) -> Path:
    """An .m4a-style mp4 with one AAC audio stream and no video stream."""
    rate = 16000
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        samples = int(rate * seconds)
        t = np.arange(samples, dtype=np.float32) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def encode_zero_frames(path: Path) -> Path:
    """A container with a video stream but not a single frame in it (use an .avi path)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # write the header although no frame follows
    return path


def truncate_file(src: Path, dst: Path, keep: float) -> Path:
    """Copy the first ``keep`` fraction of ``src``'s bytes (a download cut short)."""
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def unknown_codec_avi(src_avi: Path, dst: Path) -> Path:
    """An AVI whose video FourCC is replaced by one FFmpeg has no decoder for (``QQQQ``)."""
    data = src_avi.read_bytes()
    for tag in (b"FMP4", b"fmp4", b"XVID", b"xvid", b"DIVX", b"divx", b"mp4v"):
        data = data.replace(tag, b"QQQQ")
    dst.write_bytes(data)
    return dst
