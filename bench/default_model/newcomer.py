"""Newcomer benchmark: does the default model generalise to images a new user would draw?

The default model was trained on ``smolvlm.synth`` images (PIL shapes on a 3x3 grid in exact palette
colours, PIL text). None of that drawing code is used here: most images are matplotlib (Agg: patches
Circle / Rectangle / RegularPolygon / Polygon, ``ax.text``, ``ax.bar``), a few use Pillow primitives
the generator does not (``regular_polygon``, ``rounded_rectangle``, 4x supersampling; GaussianBlur,
shading and noise for a "blurred photo"). Colours are a little off the generator's and jittered,
canvases vary (non-square too), shapes are free-placed at varied sizes, never overlapping.

Categories: colour, count, position, size, what ("What is this?"), word, number, bars (tallest bar,
bar count), multi (two images: which has more circles), describe. Each question has a list of
accepted answers and passes if ``smolvlm.synth.answers_match`` (case, punctuation, articles, number
words) matches one. ``describe`` passes if the answer names both the colour and the kind of the one
shape in the image and invents no other: no other kind word, no "two shapes"/"three circles"...
Overall = micro average over all questions. Fixed seed: 65 images, 74 questions, ~30 s per model
(default model, one CPU thread). Answers: the library's batched greedy decoding (``runner.predict``),
16 new tokens at most, 48 for describe.

    .venv/bin/python bench/default_model/newcomer.py --model default [--model CHECKPOINT_DIR ...] \\
        [--output results.json] [--save-images DIR] [--markdown]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import re
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg backend, without pyplot
from matplotlib.figure import Figure
from matplotlib.patches import Circle, Polygon, Rectangle, RegularPolygon
from PIL import Image, ImageDraw, ImageFilter

from smolvlm.synth import answers_match

SEED = 2024
KINDS = ("circle", "square", "triangle")
CATEGORIES = ("colour", "count", "position", "size", "what", "word", "number", "bars", "multi", "describe")
# The training palette's colour names, at RGB values a little off the generator's (and jittered per shape).
COLOURS = {"red": (205, 40, 45), "green": (45, 150, 75), "blue": (40, 95, 205), "yellow": (235, 205, 35),
           "orange": (238, 140, 35), "purple": (130, 60, 170), "black": (35, 35, 40), "pink": (232, 125, 190)}
BACKGROUNDS = [(252, 252, 250), (222, 223, 226), (247, 238, 212), (208, 228, 246), (255, 255, 255)]
SIZES = [(320, 240), (400, 300), (300, 400), (512, 384), (256, 256), (448, 320), (360, 360), (640, 480)]
FONTS = [dict(family="DejaVu Sans", weight="bold"), dict(family="DejaVu Serif"), dict(family="DejaVu Sans Mono"),
         dict(family="DejaVu Sans", style="italic"), dict(family="DejaVu Serif", weight="bold")]
Shape = namedtuple("Shape", "kind colour x y r rgb")  # centre (x, y) and half-size r in pixels


def jitter(rng, rgb, d=12):
    return tuple(min(255, max(0, c + rng.randint(-d, d))) for c in rgb)


def rgbf(rgb):
    return tuple(c / 255 for c in rgb)


def place(rng, w, h, specs, regions=None):
    """``specs`` [(kind, colour, r)] -> non-overlapping Shapes; ``regions``: per shape, the
    (x0, x1, y0, y1) fractions of the canvas its centre must lie in. Shrinks all shapes on failure."""
    for attempt in range(60):
        out, scale = [], 0.93 ** attempt
        for i, (kind, colour, r) in enumerate(specs):
            r *= scale
            pad = r * 1.45 + 3  # covers the square's corners and the triangle's vertices
            x0, x1, y0, y1 = regions[i] if regions else (0, 1, 0, 1)
            for _ in range(300):
                x = rng.uniform(max(pad, x0 * w), min(w - pad, x1 * w))
                y = rng.uniform(max(pad, y0 * h), min(h - pad, y1 * h))
                if all(math.hypot(x - s.x, y - s.y) > pad + s.r * 1.45 + 6 for s in out):
                    out.append(Shape(kind, colour, x, y, r, jitter(rng, COLOURS[colour])))
                    break
            else:
                break
        if len(out) == len(specs):
            return out
    raise RuntimeError(f"cannot place {len(specs)} shapes on {w}x{h}")


def mpl_canvas(w, h, bg):
    """A w x h pixel figure with one frameless axes in pixel coordinates, y down."""
    fig = Figure(figsize=(w / 100, h / 100), dpi=100, facecolor=rgbf(bg))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, w), ylim=(h, 0))
    ax.axis("off")
    return fig, ax


def to_pil(fig):
    fig.savefig(buf := io.BytesIO(), format="png", dpi=100, facecolor=fig.get_facecolor())
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def mpl_shapes(rng, w, h, shapes, bg=None):
    fig, ax = mpl_canvas(w, h, bg or jitter(rng, rng.choice(BACKGROUNDS), 5))
    for s in shapes:
        edge = rgbf(tuple(int(c * 0.55) for c in s.rgb)) if rng.random() < 0.3 else "none"
        kw = dict(facecolor=rgbf(s.rgb), edgecolor=edge, linewidth=2.5)
        if s.kind == "circle":
            p = Circle((s.x, s.y), s.r, **kw)
        elif s.kind == "square":
            p = Rectangle((s.x - s.r, s.y - s.r), 2 * s.r, 2 * s.r, angle=rng.choice([0, 0, 0, 8, -12]),
                          rotation_point="center", **kw)
        elif rng.random() < 0.6:  # equilateral, apex up (orientation pi: the y axis is flipped)
            p = RegularPolygon((s.x, s.y + 0.2 * s.r), 3, radius=s.r * 1.2, orientation=math.pi, **kw)
        else:  # a slightly irregular triangle
            p = Polygon([(s.x - 1.1 * s.r, s.y + s.r), (s.x + 1.1 * s.r, s.y + 0.9 * s.r),
                         (s.x + rng.uniform(-0.4, 0.4) * s.r, s.y - 1.1 * s.r)], closed=True, **kw)
        ax.add_patch(p)
    return to_pil(fig)


def pil_shapes(rng, w, h, shapes, photo=False, ss=4):
    """Pillow, 4x supersampled: circles as 90-gons, squares with rounded corners, regular triangles;
    ``photo``: then blurred, shaded and noisy like a phone snapshot."""
    img = Image.new("RGB", (w * ss, h * ss), jitter(rng, rng.choice(BACKGROUNDS), 5))
    d = ImageDraw.Draw(img)
    for s in shapes:
        x, y, r = s.x * ss, s.y * ss, s.r * ss
        if s.kind == "circle":
            d.regular_polygon((x, y, r), 90, fill=s.rgb)
        elif s.kind == "square":
            d.rounded_rectangle([x - r, y - r, x + r, y + r], radius=r * 0.3, fill=s.rgb)
        else:
            d.regular_polygon((x, y + 0.2 * r, 1.2 * r), 3, rotation=rng.choice([0, 0, 6, -6]), fill=s.rgb)
    img = img.resize((w, h), Image.LANCZOS)
    if photo:
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, 9, (h, w, 3))
        arr = np.asarray(img.filter(ImageFilter.GaussianBlur(2.2)), np.float32)
        arr = arr * np.linspace(1.0, 0.85, w, dtype=np.float32)[None, :, None] + noise  # uneven light, sensor noise
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


def text_image(rng, text):
    """``text`` in large type (40-90 px, shrunk only if it would not fit), centred with some jitter."""
    w, h = rng.choice([(400, 200), (480, 240), (360, 270), (512, 256), (320, 320)])
    fig, ax = mpl_canvas(w, h, jitter(rng, rng.choice(BACKGROUNDS), 5))
    ink = rng.choice([(25, 25, 30), (20, 40, 110), (120, 20, 25), (15, 80, 40)])
    t = ax.text(w * rng.uniform(0.4, 0.6), h * rng.uniform(0.4, 0.6), text, fontsize=rng.randint(40, 90) * 0.72,
                color=rgbf(ink), ha="center", va="center", rotation=rng.choice([0, 0, 0, 6, -6]), **rng.choice(FONTS))
    while True:
        b = t.get_window_extent(fig.canvas.get_renderer())  # display pixels, y up
        if b.x0 >= 0.04 * w and b.x1 <= 0.96 * w and b.y0 >= 0.04 * h and b.y1 <= 0.96 * h:
            return to_pil(fig)
        t.set_fontsize(t.get_fontsize() * 0.9)


def bar_chart(rng, labels):
    """A matplotlib bar chart with default styling; returns (image, label of the tallest bar)."""
    w, h = rng.choice([(480, 360), (400, 300), (512, 320), (600, 400)])
    values = rng.sample(range(3, 30), len(labels))
    values[values.index(max(values))] += 5  # the tallest bar is clearly the tallest
    fig = Figure(figsize=(w / 100, h / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colour = rng.choice(["C0", [f"C{i}" for i in range(len(labels))], rgbf(jitter(rng, COLOURS["orange"]))])
    bars = ax.bar(labels, values, color=colour)
    ax.margins(y=0.12)  # room for the value labels
    if rng.random() < 0.5:
        ax.bar_label(bars)
    if rng.random() < 0.6:
        ax.set_title(rng.choice(["Votes", "Sales this week", "Favourites", "Results"]))
    fig.tight_layout()
    return to_pil(fig), labels[values.index(max(values))]


def where_gold(h=None, v=None):
    """Accepted answers for a shape on side ``h`` (left/right) and/or ``v`` (top/bottom): the side words."""
    gold = [w for s in (h, v) if s for w in (s, f"on the {s}", f"at the {s}", f"{s} side", f"on the {s} side")]
    if h and v:
        gold += [f"{v} {h}", f"in the {v} {h}", f"{v} {h} corner", f"in the {v} {h} corner", f"at the {v} {h}",
                 f"{'upper' if v == 'top' else 'lower'} {h}"]
    return gold


def in_cat(items, cat):
    return [it for it in items if cat in ("overall", it["category"])]


def build(seed):
    """-> (images {name: PIL image}, items [{id, category, question, gold, images, tokens}])."""
    images, items, cols = {}, [], list(COLOURS)

    def add(cat, imgs, question, gold, tokens=16):  # imgs: new PIL images, or names of images added before
        n0 = sum(k.startswith(cat + "-") for k in images)
        names = [im if isinstance(im, str) else f"{cat}-{n0 + i:02d}" for i, im in enumerate(imgs)]
        images.update((n, im) for n, im in zip(names, imgs) if not isinstance(im, str))
        items.append(dict(id=f"{cat}/{len(in_cat(items, cat)):02d}", category=cat, question=question, gold=gold,
                          images=names, tokens=tokens))
        return names

    def R(cat):  # one generator per category: changing one category leaves the others as they were
        return random.Random(f"{seed}/{cat}")

    rng = R("colour")  # 5 lone shapes, then 3 with other kinds around; the last drawn with Pillow
    for i in range(8):
        w, h = rng.choice(SIZES)
        kind, colour = rng.choice(KINDS), cols[i]
        others = [(k, rng.choice(cols), rng.uniform(18, 40))
                  for k in rng.choices([k for k in KINDS if k != kind], k=0 if i < 5 else rng.randint(2, 3))]
        shapes = place(rng, w, h, [(kind, colour, rng.uniform(0.12, 0.25) * min(w, h))] + others)
        img = pil_shapes(rng, w, h, shapes) if i == 7 else mpl_shapes(rng, w, h, shapes)
        add("colour", [img], f"What {rng.choice(['colour', 'color'])} is the {kind}?", [colour])

    rng = R("count")  # (circles, other shapes) per image; two questions each
    for i, (n_circ, n_other) in enumerate([(1, 0), (2, 1), (3, 2), (4, 0), (5, 3), (2, 7), (7, 3), (3, 3)]):
        w, h = rng.choice([(400, 300), (512, 384), (448, 320), (640, 480), (360, 360)])
        r = min(w, h) * (0.1 if n_circ + n_other < 6 else 0.065)
        specs = [("circle", rng.choice(cols), r * rng.uniform(0.7, 1.2)) for _ in range(n_circ)]
        specs += [(rng.choice(KINDS[1:]), rng.choice(cols), r * rng.uniform(0.7, 1.2)) for _ in range(n_other)]
        shapes = place(rng, w, h, specs)
        img = pil_shapes(rng, w, h, shapes) if i == 7 else mpl_shapes(rng, w, h, shapes)
        names = add("count", [img], "How many circles are there?", [str(n_circ)])
        add("count", names, "How many shapes are in the picture?", [str(n_circ + n_other)])

    rng = R("position")  # the asked shape near a side or corner, maybe one other shape on the opposite side
    band = {"left": (0, 0.28), "right": (0.72, 1), "top": (0, 0.28), "bottom": (0.72, 1), None: (0.3, 0.7)}
    flip = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", None: None}
    for i, (kind, hs, vs) in enumerate([("circle", "left", "top"), ("circle", "right", "bottom"), ("circle", "right", None),
                                        ("triangle", "left", None), ("triangle", "right", None), ("triangle", "left", None),
                                        ("square", None, "top"), ("square", None, "bottom")]):
        w, h = rng.choice([(300, 400), (360, 480)] if hs is None else [(512, 288), (400, 300), (480, 320)])
        other = rng.choice([k for k in KINDS if k != kind])
        specs = [(kind, rng.choice(cols), 0.09 * min(w, h))] + [(other, rng.choice(cols), 0.07 * min(w, h))] * rng.randint(0, 1)
        shapes = place(rng, w, h, specs, [(*band[hs], *band[vs]), (*band[flip[hs]], *band[flip[vs]])])
        img = pil_shapes(rng, w, h, shapes) if i == 5 else mpl_shapes(rng, w, h, shapes)
        q = {"circle": "Where is the circle?", "triangle": "Is the triangle on the left or the right?",
             "square": "Is the square at the top or the bottom?"}[kind]
        add("position", [img], q, where_gold(hs, vs))

    rng = R("size")  # one shape 2-4x the other's size
    for i, (a, b) in enumerate([("circle", "square"), ("square", "triangle"), ("circle", "triangle"),
                                ("circle", "square"), ("triangle", "square"), ("circle", "triangle")]):
        w, h = rng.choice(SIZES)
        big, small = (a, b) if i % 2 == 0 else (b, a)
        shapes = place(rng, w, h, [(big, rng.choice(cols), min(w, h) * rng.uniform(0.2, 0.26)),
                                   (small, rng.choice(cols), min(w, h) * rng.uniform(0.07, 0.1))])
        add("size", [mpl_shapes(rng, w, h, shapes)], f"Which is bigger, the {a} or the {b}?",
            [big, f"{shapes[0].colour} {big}", f"the {big} is bigger"])

    rng = R("what")  # one big shape near the centre; the last two drawn with Pillow, one a blurred photo
    for i, kind in enumerate(["circle", "square", "triangle", "triangle", "circle", "square"]):
        w, h = rng.choice(SIZES)
        colour = rng.choice(cols)
        shapes = place(rng, w, h, [(kind, colour, rng.uniform(0.25, 0.3) * min(w, h))], [(0.4, 0.6, 0.4, 0.6)])
        img = pil_shapes(rng, w, h, shapes, photo=i == 4) if i >= 4 else mpl_shapes(rng, w, h, shapes)
        add("what", [img], ["What is this?", "What shape is this?"][i % 2],
            [kind, f"a {kind}", f"{colour} {kind}", f"a {colour} {kind}"])

    rng = R("word")
    for i, word in enumerate(["hello", "CAT", "Stop", "apple", "robot", "Pizza"]):
        q = ["What word is written?", "What does it say?", "What is written in the image?"][i % 3]
        add("word", [text_image(rng, word)], q, [word.lower()])
    rng = R("number")
    for n in ["7", "42", "365", "2024", "815"]:
        add("number", [text_image(rng, n)], "What number is shown?", [n])

    rng = R("bars")
    for labels in [["cats", "dogs", "birds", "fish"], ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat"], ["tea", "coffee", "juice"],
                   ["Anna", "Ben", "Cleo", "Dan", "Eve"], ["north", "south", "east", "west", "centre"]]:
        img, top = bar_chart(rng, labels)
        names = add("bars", [img], "Which bar is the tallest?", [top.lower(), f"{top.lower()} bar"])
        add("bars", names, "How many bars are there?", [str(len(labels))])

    rng = R("multi")  # (circles in the first image, in the second), plus 0-2 other shapes each
    for c1, c2 in [(1, 3), (4, 2), (2, 5), (3, 1)]:
        panels = []
        for c in (c1, c2):
            w, h = rng.choice([(320, 240), (400, 300), (300, 300)])
            specs = [("circle", rng.choice(cols), 0.09 * min(w, h))] * c
            specs += [(rng.choice(KINDS[1:]), rng.choice(cols), 0.09 * min(w, h)) for _ in range(rng.randint(0, 2))]
            panels.append(mpl_shapes(rng, w, h, place(rng, w, h, specs)))
        more = "first" if c1 > c2 else "second"
        add("multi", panels, "Which image has more circles, the first or the second?", [more, f"{more} image", f"{more} one"])

    rng = R("describe")  # one shape; the last two drawn with Pillow, the very last a blurred photo
    for i, (kind, colour) in enumerate([("circle", "red"), ("square", "blue"), ("triangle", "green"),
                                        ("square", "orange"), ("circle", "purple")]):
        w, h = rng.choice(SIZES)
        shapes = place(rng, w, h, [(kind, colour, rng.uniform(0.18, 0.28) * min(w, h))])
        bg = jitter(rng, rng.choice(BACKGROUNDS[:3]), 5)  # never light blue: "blue" in a caption could come from it
        img = pil_shapes(rng, w, h, shapes, photo=i == 4) if i >= 3 else mpl_shapes(rng, w, h, shapes, bg)
        add("describe", [img], "Describe the image.", [f"{colour} {kind}"], tokens=48)
    return images, items


def passes(item, pred):
    if item["category"] == "describe":  # names the colour and kind of the one shape, and no other shape
        colour, kind = item["gold"][0].split()
        text = pred.lower()
        others = [k for k in ("circle", "square", "triangle") if k != kind]
        return bool(re.search(rf"\b{colour}\b", text) and re.search(rf"\b{kind}s?\b", text)
                    and not any(re.search(rf"\b{k}s?\b", text) for k in others)
                    and not re.search(r"\b(two|three|four|five|six|seven|eight|nine|ten|\d+) (shapes|circles|squares|triangles)\b", text))
    return any(answers_match(pred, g) for g in item["gold"])


def cpu_name():
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "unknown")


def table(items, models, markdown):
    head, rows = ["category", "images", "questions", *models], []
    for cat in [*CATEGORIES, "overall"]:
        its = in_cat(items, cat)
        oks = [sum(it["predictions"][m]["pass"] for it in its) for m in models]
        rows.append([f"**{cat}**" if markdown and cat == "overall" else cat, str(len({n for it in its for n in it["images"]})),
                     str(len(its)), *(f"{ok / len(its):.2f} ({ok}/{len(its)})" for ok in oks)])
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head), *rows])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in [head, *rows])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=None, metavar="DIR",
                    help="'default' (the built-in default model) or a checkpoint folder; repeatable (default: default)")
    ap.add_argument("--output", default=None, metavar="JSON", help="write every item with each model's answer here")
    ap.add_argument("--save-images", default=None, metavar="DIR", help="write the benchmark's images as PNGs here")
    ap.add_argument("--markdown", action="store_true", help="print the per-category table as Markdown")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=SEED)
    args = ap.parse_args()
    models = args.model or ["default"]

    import torch

    from smolvlm.cli.common import load_model_and_processor
    from smolvlm.evaluation.runner import predict  # batched greedy generate_batch, grouped by token budget
    from smolvlm.evaluation.tasks import Request

    torch.set_num_threads(args.threads)
    images, items = build(args.seed)
    if args.save_images:
        Path(args.save_images).mkdir(parents=True, exist_ok=True)
        for name, img in images.items():
            img.save(Path(args.save_images) / f"{name}.png")
    print(f"newcomer benchmark: {len(images)} images, {len(items)} questions, seed {args.seed}")
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} thread(s)")
    requests = [Request(id=it["id"], category=it["category"], images=[images[n] for n in it["images"]],
                        messages=[{"role": "user", "content": [{"type": "image"}] * len(it["images"])
                                   + [{"type": "text", "text": it["question"]}]}],
                        gold=it["gold"][0], question=it["question"], max_new_tokens=it["tokens"]) for it in items]
    seconds = {}
    for m in models:
        t0 = time.perf_counter()
        model, processor = load_model_and_processor(None if m == "default" else m)
        with torch.no_grad():
            preds = predict(model, processor, requests, args.batch_size)
        seconds[m] = round(time.perf_counter() - t0, 1)
        print(f"{m}: {seconds[m]} s (load + {len(requests)} answers)")
        for it, p in zip(items, preds):
            it.setdefault("predictions", {})[m] = {"answer": p, "pass": passes(it, p)}
        del model, processor
    print(table(items, models, args.markdown))
    if args.output:
        acc = {m: {cat: round(sum(it["predictions"][m]["pass"] for it in in_cat(items, cat)) / len(in_cat(items, cat)), 4)
                   for cat in [*CATEGORIES, "overall"]} for m in models}
        out = {"benchmark": "newcomer", "seed": args.seed, "cpu": cpu_name(), "threads": args.threads, "models": models,
               "seconds": seconds, "n_images": len(images), "n_questions": len(items), "accuracy": acc, "items": items}
        Path(args.output).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
