"""Deterministic synthetic image-text data in the_cauldron layout, for training (the "train" split)
and evaluation (the held-out "eval" split) alike; imports nothing else of smolvlm's.

A sample is ``{"images": [PIL.Image, ...], "texts": [{"user": q, "assistant": a}, ...],
"category": str, "id": str, "meta": dict}`` -- the_cauldron's keys (HuggingFaceM4/the_cauldron,
which SmolVLM was fine-tuned on) plus ``meta``: what was drawn and what each turn asks, so an
answer can be re-derived and checked. Answers are a word, number or short phrase that
``answers_match`` compares after normalisation, except ``caption``.

Determinism: ``make_sample(category, seed)`` seeds ``random.Random`` with the string
``"smolvlm-synth/<category>/<seed>"`` (string seeds hash with SHA-512, independent of
``PYTHONHASHSEED``), so the same category and seed give the same pixels with the same Pillow and
fonts. ``make_dataset(n, split, seed)`` gives sample ``i`` the seed ``sample_seed(split, seed, i)``
= ``2 * (seed * 2**32 + i) + b`` with ``b = 0`` for "train" and ``1`` for "eval": train seeds are
even and eval seeds odd, so the splits never share a seed, whatever ``seed`` and ``n``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from smolvlm.synth.documents import gen_chart, gen_form, gen_receipt, gen_text
from smolvlm.synth.match import answers_match, normalize_answer
from smolvlm.synth.scenes import gen_caption, gen_multi_image, gen_shapes

GENERATORS: dict[str, Callable] = {
    "shapes": gen_shapes,
    "text": gen_text,
    "chart": gen_chart,
    "receipt": gen_receipt,
    "form": gen_form,
    "multi_image": gen_multi_image,
    "caption": gen_caption,
}
CATEGORIES: tuple[str, ...] = tuple(GENERATORS)
SPLITS = {"train": 0, "eval": 1}
_MAX_N = 2**32

__all__ = ["CATEGORIES", "SPLITS", "answers_match", "check_categories", "dataset_sample", "make_dataset", "make_sample",
           "normalize_answer", "sample_seed", "split_of_seed"]


def make_sample(category: str, seed: int) -> dict[str, Any]:
    """One sample of ``category``, fully determined by ``(category, seed)``."""
    if category not in GENERATORS:
        raise ValueError(f"unknown synthetic category {category!r}; known: {list(CATEGORIES)}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = random.Random(f"smolvlm-synth/{category}/{seed}")
    images, texts, meta = GENERATORS[category](rng)
    return {"images": images, "texts": texts, "category": category, "id": f"{category}-{seed}", "meta": meta}


def sample_seed(split: str, seed: int, index: int) -> int:
    """Seed of sample ``index`` of ``make_dataset(..., split, seed)``: even for train, odd for eval."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if not 0 <= index < _MAX_N or seed < 0:
        raise ValueError(f"need 0 <= index < 2**32 and seed >= 0, got index={index}, seed={seed}")
    return 2 * (seed * _MAX_N + index) + SPLITS[split]


def split_of_seed(sample_seed_: int) -> str:
    """Which split a sample seed belongs to (its parity)."""
    return "eval" if sample_seed_ % 2 else "train"


def check_categories(categories: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
    """``categories`` as a tuple (``None``: all of ``CATEGORIES``); unknown names or an empty list raise."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    unknown = [c for c in cats if c not in GENERATORS]
    if unknown or not cats:
        raise ValueError(f"unknown or empty synth categories {unknown or list(cats)}; known: {list(CATEGORIES)}")
    return cats


def dataset_sample(index: int, split: str, seed: int, categories: tuple[str, ...]) -> dict[str, Any]:
    """Sample ``index`` of ``make_dataset(n, split, seed, categories)`` (``categories`` checked)."""
    return make_sample(categories[index % len(categories)], sample_seed(split, seed, index))


def make_dataset(n: int, split: str = "train", seed: int = 0,
                 categories: tuple[str, ...] | list[str] | None = None) -> list[dict[str, Any]]:
    """``n`` samples, categories in round-robin order (balanced), seeds from ``sample_seed``."""
    cats = check_categories(categories)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [dataset_sample(i, split, seed, cats) for i in range(n)]
