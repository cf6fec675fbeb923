"""Contact sheet of synthetic samples, to look at the data: ``python -m smolvlm.synth.preview OUT.png``."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from smolvlm.synth import CATEGORIES, make_dataset
from smolvlm.synth.draw import font

CELL_W, IMG_H, TEXT_H = 400, 300, 130


def contact_sheet(samples: list[dict[str, Any]], cols: int = 4) -> Image.Image:
    """Grid of samples: images (side by side for multi-image) above their Q/A turns."""
    rows = (len(samples) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * CELL_W, rows * (IMG_H + TEXT_H)), (90, 90, 90))
    d = ImageDraw.Draw(sheet)
    f = font("default", 13)
    for k, s in enumerate(samples):
        x, y = (k % cols) * CELL_W, (k // cols) * (IMG_H + TEXT_H)
        slot = (CELL_W - 10) // len(s["images"])
        for j, im in enumerate(s["images"]):
            t = im.copy()
            t.thumbnail((slot - 4, IMG_H - 8))
            sheet.paste(t, (x + 5 + j * slot, y + 4))
        d.rectangle([x + 2, y + IMG_H, x + CELL_W - 3, y + IMG_H + TEXT_H - 3], fill=(255, 255, 255))
        lines = [s["id"]]
        for turn in s["texts"]:
            lines += textwrap.wrap("Q: " + turn["user"], 60) + textwrap.wrap("A: " + turn["assistant"], 60)
        d.multiline_text((x + 6, y + IMG_H + 3), "\n".join(lines[:8]), font=f, fill=(0, 0, 0), spacing=2)
    return sheet


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "synth_preview.png")
    n = int(argv[1]) if len(argv) > 1 else 2 * len(CATEGORIES)
    contact_sheet(make_dataset(n, "train", seed=0)).save(out)
    print(out)


if __name__ == "__main__":
    main()
