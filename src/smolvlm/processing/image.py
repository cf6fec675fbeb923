"""Image preprocessing: longest-edge resize, grid resize, tiles + global image.

Mirrors the transformers 5.23 PIL backend (``Idefics3ImageProcessorPil`` /
``SmolVLMImageProcessorPil`` with ``PilBackend``), which is what ``AutoProcessor`` builds when
torchvision is absent. SPEC §2. Every step runs Pillow on uint8 RGB images, so results are
bit-identical. Loading and RGB conversion (input kinds, EXIF, decompression-bomb limit) live in
``image_io.py``; ``ImageInput`` and ``load_image`` are re-exported here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from smolvlm.memory import release_freed_memory
from smolvlm.processing.errors import ImageError

# Also re-exported: ``from smolvlm.processing.image import ImageInput, load_image`` keeps working.
from smolvlm.processing.image_io import ImageInput, load_image

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
# Sizes (exact 5.23 float expressions)
# ---------------------------------------------------------------------------------------------


def scale_to_longest_edge(height: int, width: int, side: int) -> tuple[int, int]:
    """The long side -> ``side``, the short side scaled, truncated, then made even; min 1 (SPEC §2.3).

    The one resize rule of images (``resize_longest_edge``) and video frames
    (``video.longest_edge_size``); they differ only in where the 4096 cap applies.
    """
    ar = width / height
    if width >= height:
        width = side
        height = int(width / ar)
        height += height % 2
    else:
        height = side
        width = int(height * ar)
        width += width % 2
    return max(height, 1), max(width, 1)


def resize_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1 (SPEC §2.3): long side -> L, short side truncated then made even, min 1, cap 4096."""
    height, width = scale_to_longest_edge(height, width, longest_edge)
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

    # numpy float32 / int64 (the reference's); torch tensors in ``pixel_dtype`` / bool when asked
    pixel_values: Any  # (B, maxN, 3, Hmax, Wmax), zero padding
    pixel_attention_mask: Any  # (B, maxN, Hmax, Wmax)
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
        budget: TileBudget | None = None, pixel_dtype: Any = None,
    ) -> ImageBatch:
        """Nested list (one list per prompt) -> padded batch arrays (SPEC §2.8).

        ``pixel_dtype`` (a torch floating dtype; ``pad_arrays``): torch tensors, pixels in that dtype and a
        bool mask, written tile by tile; default numpy float32 + int64 as the reference."""
        arrays: list[list[np.ndarray]] = []
        layouts: list[list[ImageLayout]] = []
        for sample in images:
            sample_arrays, sample_layouts = [], []
            for image in sample:
                parts, lay = self.split(image, do_image_splitting, budget)
                sample_arrays.extend(parts)  # uint8 (H, W, 3): normalized as pad_arrays writes them
                sample_layouts.append(lay)
            arrays.append(sample_arrays)
            layouts.append(sample_layouts)
        if not any(arrays):
            raise ImageError("no images in the batch")
        batch = ImageBatch(*pad_arrays(arrays, self.normalize, pixel_dtype), layouts)
        del arrays
        # The resized images and per-tile temporaries are freed now, but glibc would keep them in the
        # heap through the model's work on this batch (smolvlm/memory.py): a 512x512 image's 17 tiles,
        # 500M bf16, held 62 MiB past the batch's own 85 MiB.
        release_freed_memory()
        return batch


def pad_arrays(samples: list[list[np.ndarray]], normalize: Callable[[np.ndarray], np.ndarray] | None = None,
               pixel_dtype: Any = None) -> tuple[Any, Any]:
    """Per-sample (3, h, w) arrays -> (B, N, 3, H, W) float32 + (B, N, H, W) int64 mask (SPEC §2.8).

    ``normalize``: the arrays are uint8 (h, w, 3) images, each normalized (to (3, h, w)) as it is
    written, so their float32 copies never all exist next to the batch (a 512x512 image's 17 tiles:
    51 MiB more at the peak, and held by glibc afterwards).

    Zero padding to the most arrays per sample and the largest height / width; the mask is 1 on real
    pixels. Also pads the processor's mixed image-tile / video-frame rows (``video_inputs.py``) and
    batches of videos (``video.pad_videos``).
    ``pixel_dtype`` (a torch floating dtype): torch tensors instead, the pixels in that dtype and the
    mask bool. Each array is cast as it is written, which rounds exactly as casting the float32 batch
    afterwards would (what the model does first), so the model reads identical values; the float32
    batch never exists (a 512x512 image's 17 tiles: 31 MiB in bf16 + bool against 89 MiB).
    Needs at least one array.
    """
    flat = [a for s in samples for a in s]
    n_max = max(len(s) for s in samples)
    hw = [a.shape[:2] if normalize else a.shape[1:] for a in flat]
    h_max, w_max = max(h for h, _ in hw), max(w for _, w in hw)
    if pixel_dtype is None:
        pixel_values = np.zeros((len(samples), n_max, 3, h_max, w_max), dtype=np.float32)  # (B, N, 3, H, W)
        mask = np.zeros((len(samples), n_max, h_max, w_max), dtype=np.int64)  # (B, N, H, W)
        wrap = (lambda a: a)
    else:
        import torch

        pixel_values = torch.zeros((len(samples), n_max, 3, h_max, w_max), dtype=pixel_dtype)
        mask = torch.zeros((len(samples), n_max, h_max, w_max), dtype=torch.bool)
        wrap = torch.from_numpy
    for i, sample in enumerate(samples):
        for j, a in enumerate(sample):
            a = normalize(a) if normalize else a
            pixel_values[i, j, :, : a.shape[1], : a.shape[2]] = wrap(a)
            mask[i, j, : a.shape[1], : a.shape[2]] = 1
    return pixel_values, mask
