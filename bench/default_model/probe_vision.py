"""Linear probes on the default model's image features (connector output, 36 tokens): can shape
colour, kind (circle/square/triangle) and grid cell be read off them, for the trained tower and for
a fresh random one of the same architecture? Single-shape images from the synth generator, 800
train / 400 held out. Usage: .venv/bin/python bench/default_model/probe_vision.py [RUN/final]
(about 3 minutes on 2 cores). Results: bench/default_model/RESULTS.md."""

from __future__ import annotations

import argparse
import random

import torch
from linear_probe import image_features, linear_probe

from smolvlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.synth.draw import BACKGROUNDS, COLOURS, SHAPES, place_shapes, shapes_image

COLS, KINDS = sorted(COLOURS), list(SHAPES)


def data(n: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    imgs, yc, yk, yp = [], [], [], []
    for _ in range(n):
        side = rng.choice(range(256, 385, 32))
        c, k = rng.choice(COLS), rng.choice(KINDS)
        s = place_shapes(rng, [(k, c)], side, sizes=[rng.uniform(0.3, 0.9)])
        imgs.append(shapes_image(s, side, rng.choice(sorted(BACKGROUNDS))))
        yc.append(COLS.index(c))
        yk.append(KINDS.index(k))
        yp.append(s[0].cell[0] * 3 + s[0].cell[1])
    return imgs, torch.tensor(yc), torch.tensor(yk), torch.tensor(yp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", nargs="?", default="runs/default-model/final", help="SmolVLM folder")
    args = ap.parse_args()
    torch.manual_seed(0)
    proc = SmolVLMProcessor.from_pretrained(args.run)
    xtr, ctr, ktr, ptr = data(800, 1)
    xte, cte, kte, pte = data(400, 2)
    trained = SmolVLM.from_pretrained(args.run)
    rand = SmolVLM.from_config(trained.config)
    for name, m in (("trained", trained), ("random init", rand)):
        ftr, fte = image_features(m, proc, xtr), image_features(m, proc, xte)
        for pool, f in (("mean", lambda t: t.mean(1)), ("flat", lambda t: t.flatten(1))):
            a, b = f(ftr), f(fte)
            print(name, pool, "colour %.3f kind %.3f cell %.3f" % (
                linear_probe(a, ctr, b, cte, len(COLS)), linear_probe(a, ktr, b, kte, len(KINDS)),
                linear_probe(a, ptr, b, pte, 9)), flush=True)


if __name__ == "__main__":
    main()
