"""Text-rich images: ``text`` (printed words/numbers), ``chart`` (bar charts), ``receipt``, ``form``.

Same contract as ``scenes.py``: ``gen_*(rng) -> (images, texts, meta)`` with ``meta["qa"]``
naming what each turn asks. Amounts are printed and answered with two decimals ("12.50").
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from smolvlm.synth.draw import COLOURS, canvas, contrast_colour, font, font_names, text_size

Sample = tuple[list[Image.Image], list[dict[str, str]], dict]

WORDS = ("apple river house garden window yellow planet music orange summer pencil coffee bridge castle "
         "forest silver rabbit dragon winter island camera rocket ticket bottle mirror candle school "
         "market doctor tiger violet purple circle square simple little happy quiet bright cloud storm "
         "train plane ocean stone paper light night green table chair lemon honey sugar bread water "
         "tower north south party magic smile dance puzzle number letter street garden mountain").split()
ITEMS = ("coffee tea bagel muffin sandwich salad soup juice water cookie pizza pasta burger apple banana "
         "yogurt cake milk bread cheese").split()
SHOPS = ("Corner Cafe", "Blue Bakery", "Green Market", "Sunny Deli", "Lucky Store", "City Foods", "Happy Bowl")
FIRST = ("Alice Bob Carol David Emma Frank Grace Henry Irene Jack Laura Mark Nina Oscar Paula Sam").split()
LAST = ("Smith Jones Brown Taylor Wilson Clark Lewis Walker Young King Wright Green Baker Hill").split()
CITIES = ("Paris London Berlin Madrid Rome Vienna Lisbon Oslo Prague Dublin Tokyo Boston Denver Sydney").split()
BAR_LABELS = ("apples pears plums grapes lemons melons kiwis limes figs dates").split()
ORDINALS = ("first", "second", "third")


def _money(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def fit_font(draw: ImageDraw.ImageDraw, text: str, name: str, size: int, max_w: int):
    while size > 12 and text_size(draw, text, font(name, size))[0] > max_w:
        size -= 2
    return font(name, size), size


def text_page(rng: random.Random) -> tuple[Image.Image, ImageDraw.ImageDraw, tuple[int, ...], tuple[int, ...]]:
    """The ``text`` category's blank page: 384 x 192/256 px, a random light (or, 30%, dark)
    background and a contrasting ink. Returns (image, draw, background, ink)."""
    w, h = 384, rng.choice((192, 256))
    dark = rng.random() < 0.3
    bg = tuple(rng.randint(0, 70) for _ in range(3)) if dark else tuple(rng.randint(180, 255) for _ in range(3))
    ink = contrast_colour(rng, bg)
    img = Image.new("RGB", (w, h), bg)
    return img, canvas(img), bg, ink


def gen_text(rng: random.Random) -> Sample:
    """1-3 lines, each a word, two words or a number, in one font/size on a random background."""
    img, d, bg, ink = text_page(rng)
    w, h = img.size
    n = rng.randint(1, 3)
    lines = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            lines.append(str(rng.randint(0, 9999)))
        elif r < 0.55:
            lines.append(f"{rng.choice(WORDS)} {rng.choice(WORDS)}")
        else:
            lines.append(rng.choice(WORDS))
    lines = [rng.choice((s, s.capitalize(), s.upper())) for s in lines]
    name = rng.choice(font_names())
    size = rng.randint(20, 44) if n < 3 else rng.randint(20, 32)
    fonts = [fit_font(d, s, name, size, w - 24)[0] for s in lines]
    heights = [text_size(d, s, f)[1] for s, f in zip(lines, fonts)]
    gap = 12
    y = max(4, (h - sum(heights) - gap * (n - 1)) // 2 + rng.randint(-10, 10))
    boxes = []
    for s, f in zip(lines, fonts):
        tw = text_size(d, s, f)[0]
        x = rng.randint(12, max(12, w - 12 - tw))
        x0, y0, x1, y1 = d.textbbox((x, y), s, font=f)
        d.text((x + (x - x0), y + (y - y0)), s, font=f, fill=ink)  # top-left of the ink at (x, y)
        boxes.append([x, y, x + (x1 - x0), y + (y1 - y0)])
        y += (y1 - y0) + gap
    pool = []
    if n == 1:
        asks = ["What is written in the image?", "What does the text say?", "What does it say?", "Read the text."]
        if " " not in lines[0]:
            asks.append("What number is written?" if lines[0].isdigit() else "What word is written?")
        pool.append(({"type": "read"}, rng.choice(asks), lines[0]))
    else:
        i = rng.randrange(n)
        pool.append(({"type": "read_line", "line": i}, f"What is written on the {ORDINALS[i]} line?", lines[i]))
        pool.append(({"type": "n_lines"}, "How many lines of text are there?", str(n)))
    nums = [i for i, s in enumerate(lines) if s.isdigit()]
    if len(nums) == 1:
        pool.append(({"type": "number"}, "What number is shown in the image?", lines[nums[0]]))
    picked = rng.sample(pool, min(len(pool), rng.randint(1, 2)))
    meta = {"lines": lines, "font": name, "size": size, "boxes": boxes, "ink": list(ink), "bg": list(bg),
            "qa": [m for m, _, _ in picked]}
    return [img], [{"user": q, "assistant": a} for _, q, a in picked], meta


def gen_chart(rng: random.Random) -> Sample:
    """Vertical bar chart with value labels; values distinct so largest/smallest are unique."""
    w, h = 384, 320
    n = rng.randint(3, 6)
    labels = rng.sample(BAR_LABELS, n)
    values = rng.sample(range(1, 21), n)
    colour = rng.choice([c for c in COLOURS if c != "black"])
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = canvas(img)
    small, title_f = font("default", 14), font("default", 18)
    title = rng.choice(("Fruit sold", "Boxes per day", "Orders", "Stock"))
    d.text((w // 2 - text_size(d, title, title_f)[0] // 2, 8), title, font=title_f, fill=(0, 0, 0))
    left, right, top, bottom = 24, w - 12, 48, h - 32
    d.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=2)
    vmax = 20
    slot = (right - left) // n
    bar_w = int(slot * 0.6)
    boxes = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        x0 = left + i * slot + (slot - bar_w) // 2
        y0 = bottom - round(v * (bottom - top - 20) / vmax)
        d.rectangle([x0, y0, x0 + bar_w - 1, bottom - 1], fill=COLOURS[colour])
        boxes.append([x0, y0, x0 + bar_w - 1, bottom - 1])
        vs, ls = str(v), lab
        d.text((x0 + bar_w // 2 - text_size(d, vs, small)[0] // 2, y0 - 18), vs, font=small, fill=(0, 0, 0))
        d.text((x0 + bar_w // 2 - text_size(d, ls, small)[0] // 2, bottom + 6), ls, font=small, fill=(0, 0, 0))
    i = rng.randrange(n)
    pool = [
        ({"type": "value", "label": labels[i]}, f"What is the value of the {labels[i]} bar?", str(values[i])),
        ({"type": "largest"}, rng.choice(["Which bar is the largest?", "Which bar is the tallest?"]),
         labels[values.index(max(values))]),
        ({"type": "smallest"}, rng.choice(["Which bar is the smallest?", "Which bar is the shortest?"]),
         labels[values.index(min(values))]),
        ({"type": "n_bars"}, "How many bars are there?", str(n)),
    ]
    picked = rng.sample(pool, rng.randint(1, 3))
    meta = {"labels": labels, "values": values, "colour": colour, "boxes": boxes, "axis": [left, top, right, bottom],
            "vmax": vmax, "qa": [m for m, _, _ in picked]}
    return [img], [{"user": q, "assistant": a} for _, q, a in picked], meta


def gen_receipt(rng: random.Random) -> Sample:
    n = rng.randint(2, 5)
    items = rng.sample(ITEMS, n)
    prices = [rng.randrange(50, 1500, 5) for _ in items]  # cents
    total = sum(prices)
    shop = rng.choice(SHOPS)
    date = f"{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    w, line_h = 320, 30
    h = 60 + line_h * (n + 4)
    img = Image.new("RGB", (w, h), (252, 250, 243))
    d = canvas(img)
    name = rng.choice([f for f in font_names() if "Serif" not in f] or ["default"])
    body, head = font(name, 18), font(name, 22)
    d.text((w // 2 - text_size(d, shop, head)[0] // 2, 14), shop, font=head, fill=(0, 0, 0))
    d.text((20, 50), date, font=body, fill=(60, 60, 60))
    y = 50 + line_h
    for it, p in zip(items, prices):
        s = _money(p)
        d.text((20, y), it.capitalize(), font=body, fill=(0, 0, 0))
        d.text((w - 20 - text_size(d, s, body)[0], y), s, font=body, fill=(0, 0, 0))
        y += line_h
    d.line([(20, y + 4), (w - 20, y + 4)], fill=(0, 0, 0), width=1)
    y += 12
    d.text((20, y), "TOTAL", font=head, fill=(0, 0, 0))
    d.text((w - 20 - text_size(d, _money(total), head)[0], y), _money(total), font=head, fill=(0, 0, 0))
    i = rng.randrange(n)
    pool = [
        ({"type": "total"}, rng.choice(["What is the total?", "What is the total amount on the receipt?"]), _money(total)),
        ({"type": "price", "item": items[i]}, f"How much does the {items[i]} cost?", _money(prices[i])),
        ({"type": "shop"}, "What is the name of the shop?", shop),
        ({"type": "n_items"}, "How many items are on the receipt?", str(n)),
        ({"type": "date"}, "What is the date on the receipt?", date),
    ]
    picked = rng.sample(pool, rng.randint(1, 3))
    meta = {"shop": shop, "date": date, "items": items, "prices": prices, "total": total, "qa": [m for m, _, _ in picked]}
    return [img], [{"user": q, "assistant": a} for _, q, a in picked], meta


def gen_form(rng: random.Random) -> Sample:
    fields = {
        "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "city": rng.choice(CITIES),
        "date": f"{rng.randint(2019, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "ID number": str(rng.randint(10000, 99999)),
        "age": str(rng.randint(18, 90)),
    }
    keys = rng.sample(sorted(fields), rng.randint(3, 5))
    w, row_h = 384, 40
    h = 70 + row_h * len(keys)
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = canvas(img)
    name = rng.choice(font_names())
    f, title_f = font(name, 18), font(name, 22)
    title = rng.choice(("Registration form", "Visitor card", "Member form"))
    d.text((16, 14), title, font=title_f, fill=(0, 0, 90))
    y = 56
    for k in keys:
        d.rectangle([12, y, w - 12, y + row_h - 6], outline=(120, 120, 120), width=1)
        label = k[0].upper() + k[1:] + ":"
        d.text((20, y + 8), label, font=f, fill=(80, 80, 80))
        d.text((150, y + 8), fields[k], font=f, fill=(0, 0, 0))
        y += row_h
    asked = rng.sample(keys, rng.randint(1, 2))
    picked = [({"type": "field", "field": k}, f"What is the {k}?", fields[k]) for k in asked]
    meta = {"fields": {k: fields[k] for k in keys}, "title": title, "qa": [m for m, _, _ in picked]}
    return [img], [{"user": q, "assistant": a} for _, q, a in picked], meta
