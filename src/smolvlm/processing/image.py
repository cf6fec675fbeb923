"""Image loading and preprocessing: longest-edge resize, grid resize, tiles + global image.

Mirrors the transformers 5.23 PIL backend (``Idefics3ImageProcessorPil`` /
``SmolVLMImageProcessorPil`` with ``PilBackend``, ``image_transforms.convert_to_rgb``,
``image_utils.load_image``), which is what ``AutoProcessor`` builds when torchvision is absent.
SPEC §2. Every step runs Pillow on uint8 RGB images, so results are bit-identical.

Input kinds and how each becomes an RGB uint8 image (what 5.23 does, step by step):

* ``str`` / ``Path`` / ``bytes`` (an encoded file): 5.23 ``load_image`` opens it, applies
  ``ImageOps.exif_transpose`` (EXIF orientation IS applied) and then ``.convert("RGB")``, and the
  PIL rule below runs on that result. So alpha of RGBA/LA files is dropped *without* compositing on
  white (the hidden colours show), while palette/grey/RGB files with a tRNS colour key get the
  keyed pixels composited to white (Pillow keeps the key as ``info["transparency"]``). We do the
  same. (5.23 takes no ``bytes``; we treat bytes exactly like a file.) ``data:image/...;base64,``
  strings are decoded; ``http(s)://`` URLs are fetched with urllib only when ``allow_remote=True``.
* ``PIL.Image.Image``: no EXIF transpose (5.23 does not apply it to PIL inputs). If the image has
  an alpha band or a ``transparency`` entry (RGBA, LA, PA, P/L/RGB with tRNS) it is converted to
  RGBA and alpha-composited over opaque white, then to RGB; otherwise ``.convert("RGB")``
  (L, P, CMYK, I;16, 1, YCbCr... use Pillow's own conversion).
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
import json
import math
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from smolvlm.processing.errors import ImageError

ImageInput = Union[str, Path, bytes, bytearray, Image.Image, np.ndarray]

MAX_IMAGE_SIZE = 4096  # 5.23 caps the resized longest side at 4096 ("4k as absolute maximum")


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def _longest_edge(v: Any, key: str) -> int:
    if isinstance(v, dict) and "longest_edge" in v:
        return int(v["longest_edge"])
    raise ValueError(f"preprocessor_config.json: {key} must be {{'longest_edge': N}}, got {v!r}")


@dataclass(frozen=True)
class ImageProcessorConfig:
    """The checkpoint's ``preprocessor_config.json`` (SPEC §2.1). Defaults are 5.23's class
    defaults (Idefics3-8B values), used only for keys the file lacks."""

    longest_edge: int = 4 * 364  # L, size.longest_edge
    max_image_size: int = 364  # M, max_image_size.longest_edge (tile side)
    resample: int = Image.Resampling.LANCZOS
    do_resize: bool = True
    do_image_splitting: bool = True
    do_convert_rgb: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    do_pad: bool = True
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        kw: dict[str, Any] = {}
        if "size" in d:
            kw["longest_edge"] = _longest_edge(d["size"], "size")
        if "max_image_size" in d:
            kw["max_image_size"] = _longest_edge(d["max_image_size"], "max_image_size")
        for k in ("do_resize", "do_image_splitting", "do_convert_rgb", "do_rescale", "do_normalize", "do_pad"):
            if k in d:
                kw[k] = bool(d[k])
        if "resample" in d:
            kw["resample"] = int(d["resample"])
        if "rescale_factor" in d:
            kw["rescale_factor"] = float(d["rescale_factor"])
        for k in ("image_mean", "image_std"):
            if k in d:
                v = d[k]
                kw[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        known = {"size", "max_image_size", "resample", "rescale_factor", "image_mean", "image_std", *kw}
        cfg = cls(**kw, extra={k: v for k, v in d.items() if k not in known})
        if not cfg.do_convert_rgb or not cfg.do_pad:
            # Every released checkpoint sets both; without them the output is not a single tensor.
            raise ValueError("preprocessor_config.json: do_convert_rgb=false / do_pad=false are not supported")
        return cfg

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "ImageProcessorConfig":
        path = Path(directory) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"preprocessor_config.json not found in {directory}")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------------
# Loading: anything -> PIL RGB image
# ---------------------------------------------------------------------------------------------


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
            rgb = img.convert("RGB")
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


def _from_pil(img: Image.Image) -> Image.Image:
    """5.23 ``convert_to_rgb`` for PIL inputs: composite transparency on white, else convert."""
    _check_pixels(img.width, img.height, f"PIL image ({img.mode})")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"PIL image could not be decoded (corrupt or truncated): {e}") from None
    try:
        # 5.23 tests for an "A" band by name, so e.g. LAB (bands L, A, B) is composited too.
        if "A" in img.getbands() or img.info.get("transparency") is not None:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return img.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageError(f"PIL image of mode {img.mode} cannot be converted to RGB: {e}") from None


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


# ---------------------------------------------------------------------------------------------
# Sizes (exact 5.23 float expressions)
# ---------------------------------------------------------------------------------------------


def resize_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1 (SPEC §2.3): long side -> L, short side truncated then made even, min 1, cap 4096."""
    ar = width / height
    if width >= height:
        width = longest_edge
        height = int(width / ar)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * ar)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    # Cap at MAX_IMAGE_SIZE (no even-rounding here; only reachable with L > 4096).
    ar = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / ar)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * ar)
    return max(height, 1), max(width, 1)


def grid_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2 (SPEC §2.4): stretch to multiples of M, using 5.23's exact float expression."""
    ar = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / ar) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * ar) / tile) * tile
    return height, width


@dataclass(frozen=True)
class ImageLayout:
    """Where one image goes: sizes after each step and its tile grid (rows = cols = 0: unsplit)."""

    size: tuple[int, int]  # (H, W) of the RGB input
    resized: tuple[int, int]  # after the longest-edge resize
    grid: tuple[int, int]  # after the grid resize (== resized if not split)
    rows: int
    cols: int
    tile: int

    @property
    def num_arrays(self) -> int:
        """Arrays the image contributes to pixel_values: rows*cols tiles + 1 global, or 1."""
        return self.rows * self.cols + 1 if self.rows or self.cols else 1


@dataclass(frozen=True)
class TileBudget:
    """Opt-in tile policy (not in the reference; the default ``None`` keeps it exact).

    ``no_upscale``: resize the longest edge to ``min(L, ceil_to_M(longest edge))`` instead of
    always to L, so a small image is not blown up into a full grid (256M: a 512x512 photo is one
    512 tile instead of 4x4 + global = 17). ``max_tiles``: lower L in steps of M until the grid has
    at most this many tiles (the global image not counted; L = M means one unsplit image).
    """

    no_upscale: bool = False
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")

    def longest_edge(self, height: int, width: int, cfg: ImageProcessorConfig) -> int:
        """The resize target L' <= L this policy picks for an ``height x width`` image."""
        m, edge = cfg.max_image_size, cfg.longest_edge
        if self.no_upscale:
            edge = min(edge, max(m, math.ceil(max(height, width) / m) * m))
        if self.max_tiles is not None:
            while edge > m and _grid_tiles(resize_longest_edge(height, width, edge), m) > self.max_tiles:
                edge -= m
        return edge


def _grid_tiles(resized: tuple[int, int], m: int) -> int:
    gh, gw = grid_size(*resized, m)
    return ((gh - m) // m + 1) * ((gw - m) // m + 1) if gh > m or gw > m else 1


def plan_layout(height: int, width: int, cfg: ImageProcessorConfig, do_image_splitting: bool,
                budget: TileBudget | None = None) -> ImageLayout:
    """Sizes and grid for an ``height x width`` RGB image, without touching pixels."""
    m = cfg.max_image_size
    edge = budget.longest_edge(height, width, cfg) if budget is not None else cfg.longest_edge
    resized = resize_longest_edge(height, width, edge) if cfg.do_resize else (height, width)
    if not do_image_splitting:
        return ImageLayout((height, width), resized, (m, m), 0, 0, m)
    gh, gw = grid_size(*resized, m)
    if gh > m or gw > m:
        # 5.23 split_images: (H - M) // M + 1 splits per side (== ceil(H / M) for multiples of M).
        return ImageLayout((height, width), resized, (gh, gw), (gh - m) // m + 1, (gw - m) // m + 1, m)
    return ImageLayout((height, width), resized, (gh, gw), 0, 0, m)


# ---------------------------------------------------------------------------------------------
# Processing
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageBatch:
    """Processed images of a batch of prompts (SPEC §2.8)."""

    pixel_values: np.ndarray  # (B, maxN, 3, Hmax, Wmax) float32, zero padding
    pixel_attention_mask: np.ndarray  # (B, maxN, Hmax, Wmax) int64
    layouts: list[list[ImageLayout]]  # per prompt, per image

    @property
    def rows(self) -> list[list[int]]:
        return [[lay.rows for lay in sample] for sample in self.layouts]

    @property
    def cols(self) -> list[list[int]]:
        return [[lay.cols for lay in sample] for sample in self.layouts]


class ImageProcessor:
    """Idefics3/SmolVLM image processor (transformers 5.23 PIL backend), settings from the checkpoint."""

    def __init__(self, config: ImageProcessorConfig, *, allow_remote: bool = False) -> None:
        self.config = config
        self.allow_remote = allow_remote
        c = config
        self._mean = np.asarray(c.image_mean, dtype=np.float32)[:, None, None]  # (3, 1, 1)
        self._std = np.asarray(c.image_std, dtype=np.float32)[:, None, None]

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kw: Any) -> "ImageProcessor":
        return cls(ImageProcessorConfig.from_pretrained(directory), **kw)

    def __repr__(self) -> str:
        c = self.config
        return f"ImageProcessor(L={c.longest_edge}, M={c.max_image_size}, split={c.do_image_splitting})"

    def layout(self, image: ImageInput, do_image_splitting: bool | None = None,
               budget: TileBudget | None = None) -> ImageLayout:
        """Tile layout of one image (loads it, so EXIF orientation is honoured as in processing)."""
        img = self.load(image)
        split = self.config.do_image_splitting if do_image_splitting is None else do_image_splitting
        return plan_layout(img.height, img.width, self.config, split, budget)

    def load(self, image: ImageInput) -> Image.Image:
        return load_image(image, allow_remote=self.allow_remote)

    def _resize(self, img: Image.Image, height: int, width: int) -> Image.Image:
        # PIL returns an unmodified copy when the size is unchanged, as 5.23 relies on.
        return img.resize((width, height), resample=self.config.resample)

    def split(self, image: ImageInput, do_image_splitting: bool | None = None,
              budget: TileBudget | None = None) -> tuple[list[np.ndarray], ImageLayout]:
        """One image -> uint8 HWC arrays (tiles row-major, then the global image) and its layout."""
        split = self.config.do_image_splitting if do_image_splitting is None else do_image_splitting
        img = self.load(image)
        lay = plan_layout(img.height, img.width, self.config, split, budget)
        m = lay.tile
        if self.config.do_resize:
            img = self._resize(img, *lay.resized)
        if not split:
            return [np.asarray(self._resize(img, m, m))], lay
        img = self._resize(img, *lay.grid)
        if lay.rows == 0:
            return [np.asarray(img)], lay
        arr = np.asarray(img)  # (H, W, 3) uint8
        tiles = [arr[r * m:(r + 1) * m, c * m:(c + 1) * m] for r in range(lay.rows) for c in range(lay.cols)]
        tiles.append(np.asarray(self._resize(img, m, m)))  # global image from the grid-resized image
        return tiles, lay

    def normalize(self, arr: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> float32 (3, H, W): rescale in float64 then float32, then normalize."""
        x = arr.transpose(2, 0, 1)  # (3, H, W)
        c = self.config
        if c.do_rescale:
            x = (x.astype(np.float64) * c.rescale_factor).astype(np.float32)
        else:
            x = x.astype(np.float32)
        if c.do_normalize:
            x = (x - self._mean) / self._std
        return x

    def __call__(
        self, images: Sequence[Sequence[ImageInput]], do_image_splitting: bool | None = None,
        budget: TileBudget | None = None,
    ) -> ImageBatch:
        """Nested list (one list per prompt) -> padded batch arrays (SPEC §2.8)."""
        arrays: list[list[np.ndarray]] = []
        layouts: list[list[ImageLayout]] = []
        for sample in images:
            sample_arrays, sample_layouts = [], []
            for image in sample:
                parts, lay = self.split(image, do_image_splitting, budget)
                sample_arrays.extend(self.normalize(p) for p in parts)
                sample_layouts.append(lay)
            arrays.append(sample_arrays)
            layouts.append(sample_layouts)
        flat = [a for s in arrays for a in s]
        if not flat:
            raise ImageError("no images in the batch")
        n_max = max(len(s) for s in arrays)
        h_max = max(a.shape[1] for a in flat)
        w_max = max(a.shape[2] for a in flat)
        pixel_values = np.zeros((len(arrays), n_max, 3, h_max, w_max), dtype=np.float32)  # (B, N, 3, H, W)
        mask = np.zeros((len(arrays), n_max, h_max, w_max), dtype=np.int64)  # (B, N, H, W)
        for i, sample in enumerate(arrays):
            for j, a in enumerate(sample):
                pixel_values[i, j, :, : a.shape[1], : a.shape[2]] = a
                mask[i, j, : a.shape[1], : a.shape[2]] = 1
        return ImageBatch(pixel_values, mask, layouts)
