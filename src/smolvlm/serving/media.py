"""Images and videos named by URL in a request -> decoded media, within limits.

* ``data:`` URIs (base64) always; ``http://`` / ``https://`` only when the server was started with
  ``--allow-remote-media``, then with a size limit (checked on ``Content-Length`` and again while
  reading), a deadline for the whole download (checked between reads, so a stalled read can add
  one socket timeout), and redirects followed only to http(s).
  ``file:`` and every other scheme are refused: a request must never read the server's files.
* Images decode through ``processing.image_io`` (Pillow's decompression-bomb limit applies);
  videos are written to a temporary file and sampled with the checkpoint's SmolVLM2 settings
  (``processor.load_video``: its fps and max_frames), then the file is deleted.

Everything that goes wrong with the caller's media is an ``APIError`` 400 naming the field. These
functions block (network, decoding): the app runs them in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from smolvlm.processing.image_io import load_image
from smolvlm.serving.errors import APIError, bad_request
from smolvlm.serving.parse import MediaRef

log = logging.getLogger("smolvlm.serving")

MB = 1024 * 1024
CHUNK = 64 * 1024


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int = 20 * MB  # one image or video, after base64 decoding or download
    timeout_s: float = 10.0  # one whole download
    allow_remote: bool = False


def _too_large(ref: MediaRef, limits: MediaLimits, size: int | str) -> APIError:
    return bad_request(f"the {ref.kind} at {ref.param} is {size} bytes, over this server's limit of "
                       f"{limits.max_bytes} bytes per image or video", ref.param, "media_too_large")


def _decode_data_uri(ref: MediaRef, limits: MediaLimits) -> bytes:
    header, sep, payload = ref.url[5:].partition(",")
    if not sep or not header.lower().endswith(";base64"):
        raise bad_request(f"{ref.param}: a data: URI must be base64 (data:<type>;base64,<data>)", ref.param,
                          "invalid_media")
    payload = "".join(payload.split())  # line breaks some encoders insert
    if len(payload) * 3 // 4 > limits.max_bytes:
        raise _too_large(ref, limits, f"about {len(payload) * 3 // 4}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{ref.param}: the data: URI is not valid base64", ref.param, "invalid_media") from None
    if not data:
        raise bad_request(f"{ref.param}: the data: URI holds no data", ref.param, "invalid_media")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp:)."""

    max_redirections = 5

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.URLError(f"redirect to a non-http(s) URL refused: {newurl[:100]}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_HttpOnlyRedirects)


def _download(ref: MediaRef, limits: MediaLimits) -> bytes:
    deadline = time.monotonic() + limits.timeout_s
    req = urllib.request.Request(ref.url, headers={"User-Agent": "smolvlm-serve"})
    try:
        with _OPENER.open(req, timeout=limits.timeout_s) as r:
            size = r.headers.get("Content-Length")
            if size is not None and size.isdigit() and int(size) > limits.max_bytes:
                raise _too_large(ref, limits, int(size))
            buf = bytearray()
            while chunk := r.read1(CHUNK):  # what has arrived: the deadline is checked between reads
                buf += chunk
                if len(buf) > limits.max_bytes:
                    raise _too_large(ref, limits, f"more than {limits.max_bytes}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the download took longer than {limits.timeout_s:g} s")
            return bytes(buf)
    except APIError:
        raise
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts, resets, bad URLs
        reason = getattr(e, "reason", None) or e
        raise bad_request(f"{ref.param}: could not fetch {ref.url[:200]}: {reason}", ref.param,
                          "media_fetch_failed") from None


def fetch(ref: MediaRef, limits: MediaLimits) -> bytes:
    """The bytes a media URL names (see the module docstring for what is allowed)."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        return _decode_data_uri(ref, limits)
    if scheme in ("http", "https"):
        if not limits.allow_remote:
            raise bad_request(f"{ref.param}: remote {ref.kind} URLs are disabled on this server (start it with "
                              f"--allow-remote-media); send the {ref.kind} as a data: URI", ref.param,
                              "remote_media_disabled")
        return _download(ref, limits)
    what = "file: URLs are never accepted" if scheme == "file" else f"unsupported URL scheme {scheme or 'none'!r}"
    raise bad_request(f"{ref.param}: {what}; send the {ref.kind} as a data: URI (data:<type>;base64,...)",
                      ref.param, "invalid_media")


def load_image_ref(ref: MediaRef, limits: MediaLimits) -> Any:
    """-> PIL RGB image."""
    data = fetch(ref, limits)
    try:
        return load_image(data)
    except Exception as e:  # noqa: BLE001 (ImageError, but any decoder failure is the caller's bad data)
        raise bad_request(f"{ref.param}: {e}", ref.param, "invalid_image") from None


def load_video_ref(ref: MediaRef, limits: MediaLimits, processor: Any) -> Any:
    """-> ``VideoFrames`` sampled with the checkpoint's video settings."""
    data = fetch(ref, limits)
    fd, path = tempfile.mkstemp(prefix="smolvlm-video-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return processor.load_video(path)
        except Exception as e:  # noqa: BLE001 (VideoError, or an FFmpeg error on hostile input)
            msg = str(e).replace(path, "the video")
            raise bad_request(f"{ref.param}: {msg}", ref.param, "invalid_video") from None
    finally:
        try:
            os.unlink(path)
        except OSError:
            log.warning("could not delete the temporary video %s", path)


def load_media(refs: list[MediaRef], limits: MediaLimits, processor: Any) -> dict[tuple[str, str], Any]:
    """(kind, url) -> the decoded image / video, for every reference (a repeated URL is decoded once)."""
    out: dict[tuple[str, str], Any] = {}
    for ref in refs:
        if (ref.kind, ref.url) not in out:
            load = load_image_ref(ref, limits) if ref.kind == "image" else load_video_ref(ref, limits, processor)
            out[ref.kind, ref.url] = load
    return out
