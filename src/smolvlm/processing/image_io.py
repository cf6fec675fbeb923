"""Image loading: path / bytes / URL / PIL / array -> PIL RGB image, with clear errors.

Mirrors the transformers 5.23 PIL backend's input handling (``image_transforms.convert_to_rgb``,
``image_utils.load_image``), SPEC §2. ``image.py`` (resize, tiles, normalize, padding) runs on
the RGB image this module returns.

Input kinds and how each becomes an RGB uint8 image (what 5.23 does, step by step):

* ``str`` / ``Path`` / ``bytes`` (an encoded file): 5.23 ``load_image`` opens it, applies
  ``ImageOps.exif_transpose`` (EXIF orientation IS applied) and then ``.convert("RGB")``, and the
  PIL rule below runs on that result. So alpha of RGBA/LA files is dropped *without* compositing on
  white (the hidden colours show), while palette/grey/RGB files with a tRNS colour key get the
  keyed pixels composited to white (Pillow keeps the key as ``info["transparency"]``). We do the
  same. (5.23 takes no ``bytes``; we treat bytes exactly like a file.) ``data:image/...;base64,``
  strings are decoded; ``http(s)://`` URLs are fetched with urllib only when ``allow_remote=True``.
* 16-bit and 32-bit integer grey images (Pillow modes ``I;16``, ``I;16B``, ``I;16L``, ``I;16N``,
  ``I``; e.g. 16-bit PNG/TIFF), any input kind: scaled to 8 bits, ``round(v * 255 / 65535)`` with
  ``v`` clipped to 0..65535, before the rest. **Deliberate difference**: 5.23 (Pillow's
  ``convert``) clips values to 255 instead, so a 16-bit photo comes out almost all white.
* ``PIL.Image.Image``: no EXIF transpose (5.23 does not apply it to PIL inputs). If the image has
  an alpha band or a ``transparency`` entry (RGBA, LA, PA, P/L/RGB with tRNS) it is converted to
  RGBA and alpha-composited over opaque white, then to RGB; otherwise ``.convert("RGB")``
  (L, P, CMYK, 1, YCbCr... use Pillow's own conversion).
* ``numpy.ndarray`` uint8, ``(H, W, C)`` with C in {1, 3, 4}, or ``(H, W)``: 1 channel is repeated
  to 3; 4 channels are composited on white in float64 and rounded (5.23's numpy branch of
  ``convert_to_rgb``). ``(H, W)`` is our extension (5.23 rejects 2-D arrays); it is treated as
  ``(H, W, 1)``. Channel-first arrays are not accepted (5.23 guesses the layout; we do not).

RGB conversion happens *before* resizing (5.x order; 4.x converted after resizing, SPEC §2.6).
Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``) applies to every input;
exceeding it raises ``ImageError`` (set the limit to ``None`` to lift it).
"""

from __future__ import annotations

import base64
import io
import urllib.request
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smolvlm.processing.errors import ImageError

ImageInput = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]


def _check_pixels(width: int, height: int, what: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if width <= 0 or height <= 0:
        raise ImageError(f"{what} is empty ({width}x{height} pixels)")
    if limit is not None and width * height > limit:
        raise ImageError(
            f"{what} has {width * height} pixels ({width}x{height}), above Pillow's decompression-bomb "
            f"limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS); raise that limit if you trust the image"
        )


def _open_encoded(data: bytes, what: str) -> Image.Image:
    """Decode an encoded image fully, as 5.23 ``load_image`` + ``convert_to_rgb`` do."""
    if len(data) == 0:
        raise ImageError(f"{what} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x the limit; treat the warning as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            _check_pixels(img.width, img.height, what)
            img.load()  # decode now: truncated/corrupt data fails here, not later
            img = ImageOps.exif_transpose(img)
            rgb = to_8bit(img).convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{what}: {e} (limit PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not a recognised image file ({len(data)} bytes)") from None
    except ImageError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError(f"{what} is corrupt or truncated: {e}") from None
    # convert("RGB") keeps a tRNS colour key as info["transparency"]; 5.23 then runs convert_to_rgb
    # on the loaded image, which composites the keyed pixels on white.
    return _from_pil(rgb)


def _fetch_url(url: str, timeout: float) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 (http/https checked by caller)
            return r.read()
    except OSError as e:
        raise ImageError(f"could not download image {url}: {e}") from None


# Pillow's wide integer grey modes; "I" (int32) is what older Pillows give a 16-bit PNG.
WIDE_INT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def to_8bit(img: Image.Image) -> Image.Image:
    """A 16/32-bit integer grey image -> 8-bit "L", ``round(v * 255 / 65535)``; other modes unchanged.

    Not the reference: Pillow's ``convert`` (and so 5.23) clips to 255. A ``transparency`` key
    value makes its pixels white, as compositing the keyed pixels on white does for 8-bit images.
    """
    if img.mode not in WIDE_INT_MODES:
        return img
    v = np.asarray(img).astype(np.int64)  # (H, W)
    out = (np.clip(v, 0, 65535) * 255 + 32767) // 65535  # exact rounding: v * 255 / 65535 is never x.5
    key = img.info.get("transparency")
    if isinstance(key, int):
        out[v == key] = 255
    return Image.fromarray(out.astype(np.uint8), mode="L")


def to_rgb(img: Image.Image) -> Image.Image:
    """5.23 ``convert_to_rgb`` for a loaded PIL image: composite transparency on white, else convert
    (wide integer images are first scaled to 8 bits, see ``to_8bit``)."""
    img = to_8bit(img)
    try:
        # 5.23 tests for an "A" band by name, so e.g. LAB (bands L, A, B) is composited too.
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"PIL image of mode {img.mode} cannot be converted to RGB: {e}") from None


def _from_pil(img: Image.Image) -> Image.Image:
    """A PIL input: size limit, decode, then ``to_rgb``."""
    _check_pixels(img.width, img.height, f"PIL image ({img.mode})")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"PIL image could not be decoded (corrupt or truncated): {e}") from None
    return to_rgb(img)


def _from_array(a: np.ndarray) -> Image.Image:
    """uint8 HWC / HW array -> RGB, as 5.23's numpy branch of ``convert_to_rgb`` (channels-last)."""
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ImageError(f"image array must be (H, W), or (H, W, C) with C in 1, 3, 4; got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise ImageError(f"image array ({a.dtype}, shape {a.shape}) contains NaN or infinite values")
    if a.dtype != np.uint8:
        raise ImageError(
            f"image array must have dtype uint8 (0..255), got {a.dtype}; e.g. convert a float array in [0, 1] "
            "with (x * 255).round().astype(np.uint8)"
        )
    _check_pixels(a.shape[1], a.shape[0], f"image array {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 4:
        alpha = a[..., 3:4] / 255  # float64
        a = np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a), mode="RGB")


def load_image(src: ImageInput, *, allow_remote: bool = False, timeout: float = 30.0) -> Image.Image:
    """Any supported input -> PIL RGB image, exactly as transformers 5.23 prepares it (see module doc)."""
    if isinstance(src, Image.Image):
        return _from_pil(src)
    if isinstance(src, np.ndarray):
        return _from_array(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _open_encoded(bytes(src), "image bytes")
    if isinstance(src, (str, Path)):
        s = str(src)
        if isinstance(src, str) and s.startswith(("http://", "https://")):
            if not allow_remote:
                raise ImageError(f"refusing to download {s}: remote images need allow_remote=True")
            return _open_encoded(_fetch_url(s, timeout), s)
        if isinstance(src, str) and s.startswith("data:image/"):
            try:
                data = base64.b64decode(s.split(",", 1)[1], validate=False)
            except (IndexError, ValueError) as e:
                raise ImageError(f"bad data: URI for an image: {e}") from None
            return _open_encoded(data, "data: URI image")
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"image file not found: {s}")
        if not p.is_file():
            raise ImageError(f"image path is not a file: {s}")
        return _open_encoded(p.read_bytes(), f"image file {s}")
    raise ImageError(
        f"unsupported image type {type(src).__name__}: use a path, URL, bytes, PIL image or uint8 numpy array"
    )
