"""Is the word in a one-word image linearly readable from the image features (connector output,
the vectors the language model sees)? One word of the synth vocabulary (``documents.WORDS``) per
image, drawn as ``gen_text`` draws a line (random font, size 20-44 px, case, place, background);
a linear classifier over the words on the flattened features (position by position) and on their
mean over the 36 tokens (position-free), 2,400 train / 600 held out, for each run given and for a
fresh random tower of the same architecture.

    .venv/bin/python bench/default_model/probe_words.py [--fixed-position] [RUN/final ...]

``--fixed-position`` puts every word at the same top-left place, so that the flattened probe needs
no position invariance.

Default: runs/default-model/final. About 5 minutes on 2 cores. Results: RESULTS.md.
"""

from __future__ import annotations

import argparse
import random

import torch
from linear_probe import image_features, linear_probe
from PIL import Image

from smolvlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.synth.documents import WORDS, fit_font, text_page
from smolvlm.synth.draw import font_names

VOCAB = sorted(set(WORDS))


def word_image(rng: random.Random, fixed: bool = False) -> tuple[Image.Image, int]:
    """One word; ``fixed``: always at the top-left corner (12, 4) instead of a random place."""
    img, d, _, ink = text_page(rng)
    w, h = img.size
    k = rng.randrange(len(VOCAB))
    s = rng.choice((VOCAB[k], VOCAB[k].capitalize(), VOCAB[k].upper()))
    f, _ = fit_font(d, s, rng.choice(font_names()), rng.randint(20, 44), w - 24)
    x0, y0, x1, y1 = d.textbbox((0, 0), s, font=f)
    x = rng.randint(12, max(12, w - 12 - (x1 - x0)))
    y = rng.randint(4, max(4, h - 4 - (y1 - y0)))
    if fixed:
        x, y = 12, 4
    d.text((x - x0, y - y0), s, font=f, fill=ink)
    return img, k


def data(n: int, seed: int, fixed: bool = False) -> tuple[list[Image.Image], torch.Tensor]:
    rng = random.Random(seed)
    pairs = [word_image(rng, fixed) for _ in range(n)]
    return [p[0] for p in pairs], torch.tensor([p[1] for p in pairs])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=["runs/default-model/final"], help="SmolVLM folders")
    ap.add_argument("--fixed-position", action="store_true", help="every word at the top-left corner")
    args = ap.parse_args()
    torch.manual_seed(0)
    proc = SmolVLMProcessor.from_pretrained(args.runs[0])
    xtr, ytr = data(2400, 1, args.fixed_position)
    xte, yte = data(600, 2, args.fixed_position)
    models = [(r, SmolVLM.from_pretrained(r)) for r in args.runs]
    models.append(("random init", SmolVLM.from_config(models[0][1].config)))
    print(f"{len(VOCAB)} words; chance {1 / len(VOCAB):.3f}")
    for name, m in models:
        ftr, fte = image_features(m, proc, xtr), image_features(m, proc, xte)
        flat = linear_probe(ftr.flatten(1), ytr, fte.flatten(1), yte, len(VOCAB))
        mean = linear_probe(ftr.mean(1), ytr, fte.mean(1), yte, len(VOCAB))
        print(f"{name}: word accuracy, flattened {flat:.3f}, mean over tokens {mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
