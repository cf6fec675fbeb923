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

import random
import sys

import torch
from PIL import Image

from smolvlm import SmolVLM
from smolvlm.processing.processor import SmolVLMProcessor
from smolvlm.training.synth.documents import WORDS, _fit_font, text_page
from smolvlm.training.synth.draw import font_names

VOCAB = sorted(set(WORDS))


def word_image(rng: random.Random, fixed: bool = False) -> tuple[Image.Image, int]:
    """One word; ``fixed``: always at the top-left corner (12, 4) instead of a random place."""
    img, d, _, ink = text_page(rng)
    w, h = img.size
    k = rng.randrange(len(VOCAB))
    s = rng.choice((VOCAB[k], VOCAB[k].capitalize(), VOCAB[k].upper()))
    f, _ = _fit_font(d, s, rng.choice(font_names()), rng.randint(20, 44), w - 24)
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


def feats(model: SmolVLM, proc: SmolVLMProcessor, imgs: list[Image.Image]) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(imgs), 16):
            pv = torch.cat([proc(text=["<image>"], images=[[im]])["pixel_values"] for im in imgs[i:i + 16]], 0)
            out.append(model.get_image_features(pv).float())
    return torch.cat(out)  # (n, 36, D)


def probe(ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor, ncls: int) -> float:
    mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    w = torch.zeros(ftr.shape[1], ncls, requires_grad=True)
    b = torch.zeros(ncls, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ftr @ w + b, ytr) + 1e-3 * (w ** 2).sum()
        loss.backward()
        opt.step()
    return ((fte @ w + b).argmax(1) == yte).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    args = sys.argv[1:]
    fixed = "--fixed-position" in args
    runs = [a for a in args if a != "--fixed-position"] or ["runs/default-model/final"]
    proc = SmolVLMProcessor.from_pretrained(runs[0])
    xtr, ytr = data(2400, 1, fixed)
    xte, yte = data(600, 2, fixed)
    models = [(r, SmolVLM.from_pretrained(r)) for r in runs]
    models.append(("random init", SmolVLM.from_config(models[0][1].config)))
    print(f"{len(VOCAB)} words; chance {1 / len(VOCAB):.3f}")
    for name, m in models:
        ftr, fte = feats(m, proc, xtr), feats(m, proc, xte)
        flat = probe(ftr.flatten(1), ytr, fte.flatten(1), yte, len(VOCAB))
        mean = probe(ftr.mean(1), ytr, fte.mean(1), yte, len(VOCAB))
        print(f"{name}: word accuracy, flattened {flat:.3f}, mean over tokens {mean:.3f}", flush=True)


if __name__ == "__main__":
    main()
