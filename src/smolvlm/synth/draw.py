"""Drawing helpers for the synthetic data: colour palette, fonts, shapes on a grid.

Everything is drawn with PIL from a ``random.Random`` passed in, so a seed fixes every pixel.
Fonts: PIL's built-in scalable font (``ImageFont.load_default(size=...)``) plus the DejaVu/STIX
TrueType files that matplotlib ships in ``mpl-data/fonts/ttf`` (found without importing
matplotlib). Only bundled files are used, not system fonts, so the same package versions give the
same pixels on every machine; without matplotlib the generator falls back to PIL's font only.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Colour names a small model can learn to tell apart; RGB values far from each other and from
# the light backgrounds below.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (240, 200, 0),
    "orange": (245, 130, 20), "purple": (140, 50, 180), "black": (20, 20, 20), "pink": (240, 110, 180),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255), "light grey": (225, 225, 225), "cream": (250, 240, 215), "light blue": (215, 235, 250),
}
SHAPES = ("circle", "square", "triangle")
TTF_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
             "DejaVuSansMono.ttf", "STIXGeneral.ttf")


def _mpl_font_dir() -> Path | None:
    spec = importlib.util.find_spec("matplotlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf"
    return d if d.is_dir() else None


@lru_cache(maxsize=1)
def font_names() -> tuple[str, ...]:
    """Available font names: ``"default"`` (PIL's) plus the bundled TrueType files found."""
    d = _mpl_font_dir()
    found = tuple(f for f in TTF_FILES if d is not None and (d / f).is_file())
    return ("default", *found)


@lru_cache(maxsize=256)
def font(name: str, size: int) -> ImageFont.FreeTypeFont:
    if name == "default":
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(_mpl_font_dir() / name), size=size)


@dataclass(frozen=True)
class Glyph:
    """One drawn character: the image it was drawn on and its ink box (x0, y0, x1, y1) in pixels;
    ``text`` is the whole line drawn by that ``text`` call, ``index`` the character's place in it and
    ``run`` tells the calls apart (the same for every character of one call)."""

    image: Image.Image
    char: str
    box: tuple[int, int, int, int]
    text: str = ""
    index: int = 0
    run: int = 0


_GLYPH_LOG: contextvars.ContextVar[list[Glyph] | None] = contextvars.ContextVar("smolvlm_glyph_log", default=None)


class GlyphDraw(ImageDraw.ImageDraw):
    """``ImageDraw`` that, inside ``record_glyphs()``, logs the ink box of every character it
    draws with ``text`` (left-anchored, one line: how the generators draw). Pixels are exactly
    those of ``ImageDraw.Draw``; outside a recording nothing extra happens."""

    def text(self, xy, text, fill=None, font=None, *args, **kwargs):  # type: ignore[override]
        super().text(xy, text, fill, font, *args, **kwargs)
        log = _GLYPH_LOG.get()
        if log is None:
            return
        if args or kwargs or "\n" in text:  # anchors, spacing, multi-line: boxes would be wrong, never silently
            raise ValueError(f"record_glyphs: cannot place characters drawn with extra options "
                             f"{sorted(kwargs) or list(args)} or line breaks; draw one left-anchored line per call")
        x, y = xy
        run = len(log)  # the index of this call's first glyph: unique per call
        for i, ch in enumerate(text):
            if ch.isspace():
                continue
            left = x + font.getlength(text[:i])
            x0, y0, x1, y1 = self.textbbox((left, y), ch, font=font)
            log.append(Glyph(self._image, ch, (int(x0), int(y0), int(x1), int(y1)), text, i, run))


def canvas(img: Image.Image) -> GlyphDraw:
    """The drawing surface the generators use (``ImageDraw.Draw`` that can record glyphs)."""
    return GlyphDraw(img)


@contextlib.contextmanager
def record_glyphs() -> Iterator[list[Glyph]]:
    """Collect a ``Glyph`` for every character drawn by ``canvas`` objects inside the block (the
    dense character targets of vision pretraining come from here)."""
    log: list[Glyph] = []
    token = _GLYPH_LOG.set(log)
    try:
        yield log
    finally:
        _GLYPH_LOG.reset(token)


def text_size(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.FreeTypeFont) -> tuple[int, int]:
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return x1 - x0, y1 - y0


def contrast_colour(rng: random.Random, bg: tuple[int, int, int]) -> tuple[int, int, int]:
    """A random dark ink for a light background or a light one for a dark background."""
    light = sum(bg) / 3 > 128
    lo, hi = (0, 90) if light else (200, 255)
    return tuple(rng.randint(lo, hi) for _ in range(3))  # type: ignore[return-value]


@dataclass(frozen=True)
class Shape:
    """One drawn shape; ``box`` = (x0, y0, x1, y1) in pixels, ``cell`` = (row, col) on the grid."""

    kind: str
    colour: str
    box: tuple[int, int, int, int]
    cell: tuple[int, int]

    @property
    def centre(self) -> tuple[int, int]:
        return (self.box[0] + self.box[2]) // 2, (self.box[1] + self.box[3]) // 2

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0]

    def as_dict(self) -> dict:
        return {"kind": self.kind, "colour": self.colour, "box": list(self.box), "cell": list(self.cell)}


def draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    rgb = COLOURS[s.colour]
    x0, y0, x1, y1 = s.box
    if s.kind == "circle":
        draw.ellipse(s.box, fill=rgb)
    elif s.kind == "square":
        draw.rectangle(s.box, fill=rgb)
    elif s.kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)
    else:
        raise ValueError(f"unknown shape kind {s.kind!r}")


def place_shapes(rng: random.Random, specs: list[tuple[str, str]], side: int, grid: int = 3,
                 cells: list[tuple[int, int]] | None = None, sizes: list[float] | None = None) -> list[Shape]:
    """Put shapes ``(kind, colour)`` in distinct cells of a ``grid`` x ``grid`` layout.

    One shape per cell, so shapes never overlap and each has a clear row/column. ``sizes`` are
    fractions of the cell (default: random 0.45-0.8); the shape is jittered inside its cell.
    """
    cell = side // grid
    if cells is None:
        all_cells = [(r, c) for r in range(grid) for c in range(grid)]
        cells = rng.sample(all_cells, len(specs))
    out = []
    for i, ((kind, colour), (r, c)) in enumerate(zip(specs, cells)):
        frac = sizes[i] if sizes is not None else rng.uniform(0.45, 0.8)
        w = max(12, int(cell * frac))
        x0 = c * cell + rng.randint(0, cell - w)
        y0 = r * cell + rng.randint(0, cell - w)
        out.append(Shape(kind, colour, (x0, y0, x0 + w - 1, y0 + w - 1), (r, c)))
    return out


def shapes_image(shapes: list[Shape], side: int, bg: str) -> Image.Image:
    img = Image.new("RGB", (side, side), BACKGROUNDS[bg])
    d = canvas(img)
    for s in shapes:
        draw_shape(d, s)
    return img


def plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def number_word(n: int) -> str:
    """0-20 as words for captions ("two blue squares")."""
    words = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
             "fifteen sixteen seventeen eighteen nineteen twenty").split()
    return words[n] if 0 <= n < len(words) else str(n)


def clamp_side(rng: random.Random, lo: int = 256, hi: int = 384, step: int = 32) -> int:
    """A random canvas side in [lo, hi], a multiple of ``step``."""
    return rng.randrange(lo, hi + 1, step)
