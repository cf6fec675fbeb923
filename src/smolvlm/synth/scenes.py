"""Shape scenes: ``shapes`` (colour/count/relation/size QA), ``multi_image`` and ``caption``.

Each generator takes a ``random.Random`` and returns ``(images, texts, meta)``: ``texts`` is a
list of ``{"user", "assistant"}`` turns, ``meta["qa"]`` says for each turn what was asked (type
and arguments) so an answer can be re-derived from ``meta`` alone (the tests do).
"""

from __future__ import annotations

import random
from collections import Counter

from PIL import Image

from smolvlm.synth.draw import BACKGROUNDS, COLOURS, SHAPES, Shape, clamp_side, number_word, place_shapes, plural, shapes_image

Sample = tuple[list[Image.Image], list[dict[str, str]], dict]
_ROWS, _COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


def _scene(rng: random.Random, n: int, colours: list[str] | None = None) -> tuple[list[Shape], int, str]:
    side = clamp_side(rng)
    colours = colours or rng.sample(sorted(COLOURS), 5)  # few colours -> repeats happen, and uniques too
    specs = [(rng.choice(SHAPES), rng.choice(colours)) for _ in range(n)]
    sizes = [rng.uniform(0.3, 0.9) for _ in range(n)]
    return place_shapes(rng, specs, side, sizes=sizes), side, rng.choice(sorted(BACKGROUNDS))


def _questions(rng: random.Random, shapes: list[Shape]) -> list[tuple[dict, str, str]]:
    """Every answerable (qa-meta, question, answer) for this scene."""
    kinds = Counter(s.kind for s in shapes)
    colours = Counter(s.colour for s in shapes)
    out = []
    for k in SHAPES:
        q = rng.choice([f"How many {k}s are there?", f"How many {k}s are in the image?", f"Count the {k}s."])
        out.append(({"type": "count", "kind": k}, q, str(kinds[k])))
    out.append(({"type": "count_all"}, rng.choice(["How many shapes are there?", "How many shapes can you see?"]),
                str(len(shapes))))
    for s in shapes:
        if kinds[s.kind] == 1:
            q = rng.choice([f"What colour is the {s.kind}?", f"What is the colour of the {s.kind}?",
                            f"What color is the {s.kind}?", f"Which colour is the {s.kind}?"])
            out.append(({"type": "colour", "kind": s.kind}, q, s.colour))
            q = rng.choice([f"Where is the {s.kind}?", f"Where is the {s.kind} in the image?"])
            out.append(({"type": "where", "kind": s.kind}, q, where_words(s.cell)))
    if len(shapes) == 1:
        q = rng.choice(["What is this?", "What shape is this?", "What is in the image?", "What do you see?"])
        out.append(({"type": "what"}, q, f"a {shapes[0].colour} {shapes[0].kind}"))
    uniq = [s for s in shapes if colours[s.colour] == 1]
    for a in uniq:
        for b in uniq:
            if a is b:
                continue
            if a.cell[1] != b.cell[1]:
                yes = a.centre[0] < b.centre[0]
                out.append(({"type": "left_of", "a": a.colour, "b": b.colour},
                            f"Is the {a.colour} shape left of the {b.colour} shape?", "yes" if yes else "no"))
            if a.cell[0] != b.cell[0]:
                yes = a.centre[1] < b.centre[1]
                out.append(({"type": "above", "a": a.colour, "b": b.colour},
                            f"Is the {a.colour} shape above the {b.colour} shape?", "yes" if yes else "no"))
    one = [s for s in shapes if kinds[s.kind] == 1]
    for a in one:
        for b in one:
            if a is not b and a.size >= 1.5 * b.size:  # clearly bigger, not a judgement call
                first, second = sorted([a.kind, b.kind], key=lambda k: rng.random())
                out.append(({"type": "bigger", "a": first, "b": second},
                            f"Which is bigger, the {first} or the {second}?", a.kind))
    for s in one:
        if s.cell[1] != 1:
            q = rng.choice([f"Is the {s.kind} on the left or the right side of the image?",
                            f"Is the {s.kind} on the left or the right?"])
            out.append(({"type": "side", "kind": s.kind}, q, _COLS[s.cell[1]]))
        if s.cell[0] != 1:
            q = rng.choice([f"Is the {s.kind} at the top or the bottom?",
                            f"Is the {s.kind} in the top or the bottom half of the image?"])
            out.append(({"type": "vside", "kind": s.kind}, q, _ROWS[s.cell[0]]))
    return out


def where_words(cell: tuple[int, int]) -> str:
    """Where a grid cell lies, as a user would say it: "top left", "bottom", "centre"..."""
    row, col = _ROWS[cell[0]], _COLS[cell[1]]
    if row == "middle":
        return col
    return row if col == "centre" else f"{row} {col}"


def gen_shapes(rng: random.Random) -> Sample:
    shapes, side, bg = _scene(rng, rng.choice((1, 1, 2, 3, 4, 5, 6, 7, 8, 9)))
    pool = _questions(rng, shapes)
    # Prefer one question of each type, so count questions (always available) don't dominate.
    by_type: dict[str, list] = {}
    for item in pool:
        by_type.setdefault(item[0]["type"], []).append(item)
    types = rng.sample(sorted(by_type), min(len(by_type), rng.randint(1, 3)))
    picked = [rng.choice(by_type[t]) for t in types]
    texts = [{"user": q, "assistant": a} for _, q, a in picked]
    meta = {"shapes": [s.as_dict() for s in shapes], "background": bg, "qa": [m for m, _, _ in picked]}
    return [shapes_image(shapes, side, bg)], texts, meta


def gen_multi_image(rng: random.Random) -> Sample:
    """Two panels; the target kind appears a different number of times in each."""
    kind = rng.choice(SHAPES)
    others = [k for k in SHAPES if k != kind]
    c1, c2 = rng.sample(range(0, 5), 2)
    images, panels = [], []
    for count in (c1, c2):
        colour = rng.choice(sorted(COLOURS))
        specs = [(kind, colour)] * count + [(rng.choice(others), rng.choice(sorted(COLOURS)))
                                            for _ in range(rng.randint(0, 2))]
        shapes = place_shapes(rng, rng.sample(specs, len(specs)), 256)
        bg = rng.choice(sorted(BACKGROUNDS))
        images.append(shapes_image(shapes, 256, bg))
        panels.append({"shapes": [s.as_dict() for s in shapes], "background": bg})
    which = rng.randrange(2)
    ordinal = ("first", "second")[which]
    pool = [
        ({"type": "more", "kind": kind}, f"Which image has more {kind}s, the first or the second?",
         "first" if c1 > c2 else "second"),
        ({"type": "count_in", "kind": kind, "image": which}, f"How many {kind}s are in the {ordinal} image?",
         str((c1, c2)[which])),
        ({"type": "same_background"}, "Do the two images have the same background colour?",
         "yes" if panels[0]["background"] == panels[1]["background"] else "no"),
    ]
    picked = rng.sample(pool, rng.randint(1, 2))
    texts = [{"user": q, "assistant": a} for _, q, a in picked]
    return images, texts, {"panels": panels, "qa": [m for m, _, _ in picked]}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(shapes: list[Shape], bg: str) -> str:
    """Canonical caption: shapes grouped by (colour, kind) in reading order, then the background.

    e.g. "Three shapes on a white background: a red circle, two blue squares and an orange triangle."
    """
    order = sorted(shapes, key=lambda s: s.cell)
    groups: dict[tuple[str, str], int] = {}
    for s in order:
        groups[(s.colour, s.kind)] = groups.get((s.colour, s.kind), 0) + 1
    parts = [(_article(c) if n == 1 else number_word(n)) + f" {c} {plural(k, n)}" for (c, k), n in groups.items()]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(shapes)
    head = "One shape" if n == 1 else f"{number_word(n).capitalize()} shapes"
    return f"{head} on a {bg} background: {listed}."


def gen_caption(rng: random.Random) -> Sample:
    shapes, side, bg = _scene(rng, rng.randint(1, 5))
    q = rng.choice(["Describe the image.", "What is in this picture?", "Write a short caption for this image."])
    texts = [{"user": q, "assistant": caption_for(shapes, bg)}]
    meta = {"shapes": [s.as_dict() for s in shapes], "background": bg, "qa": [{"type": "caption"}]}
    return [shapes_image(shapes, side, bg)], texts, meta
