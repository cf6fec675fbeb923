"""smolvlm.synth: determinism, split disjointness, answers consistent with the drawing."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import pytest

from smolvlm.synth import (
    CATEGORIES, answers_match, make_dataset, make_sample, normalize_answer, sample_seed, split_of_seed,
)
from smolvlm.synth.draw import COLOURS
from smolvlm.synth.preview import contact_sheet
from smolvlm.synth.scenes import _COLS

SEEDS = range(12)


def _digest(sample) -> str:
    h = hashlib.sha256()
    for im in sample["images"]:
        h.update(repr((im.mode, im.size)).encode())
        h.update(im.tobytes())
    h.update(repr(sample["texts"]).encode())
    return h.hexdigest()


# -- determinism and splits --------------------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
def test_same_seed_same_bytes(category):
    a, b = make_sample(category, 7), make_sample(category, 7)
    assert _digest(a) == _digest(b) and a["meta"] == b["meta"] and a["id"] == b["id"] == f"{category}-7"
    assert len({_digest(make_sample(category, s)) for s in range(6)}) == 6  # the seed matters


def test_deterministic_across_processes():
    """String seeds go through SHA-512, not ``hash()``: another PYTHONHASHSEED gives the same data."""
    code = ("import hashlib, sys; from smolvlm.synth import make_dataset; "
            "h = hashlib.sha256(); [h.update(im.tobytes()) or h.update(repr(s['texts']).encode()) "
            "for s in make_dataset(7, 'eval', 2) for im in s['images']]; print(h.hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    h = hashlib.sha256()
    for s in make_dataset(7, "eval", 2):
        for im in s["images"]:
            h.update(im.tobytes())
            h.update(repr(s["texts"]).encode())
    assert out.stdout.strip() == h.hexdigest()


def test_dataset_deterministic_and_balanced():
    a, b = make_dataset(14, "train", seed=3), make_dataset(14, "train", seed=3)
    assert [_digest(s) for s in a] == [_digest(s) for s in b]
    assert Counter(s["category"] for s in a) == {c: 2 for c in CATEGORIES}
    assert [_digest(s) for s in make_dataset(14, "train", seed=4)] != [_digest(s) for s in a]


def test_splits_disjoint():
    # By construction: train seeds even, eval odd, for every dataset seed and index.
    for seed in (0, 1, 12345):
        for i in (0, 1, 99, 2**32 - 1):
            assert sample_seed("train", seed, i) % 2 == 0 and sample_seed("eval", seed, i) % 2 == 1
            assert split_of_seed(sample_seed("eval", seed, i)) == "eval"
    train = make_dataset(70, "train", seed=0) + make_dataset(70, "train", seed=1)
    ev = make_dataset(70, "eval", seed=0)
    assert not {s["id"] for s in train} & {s["id"] for s in ev}
    # and by content: no eval image/QA set equals a train one
    assert not {_digest(s) for s in train} & {_digest(s) for s in ev}
    assert all(split_of_seed(int(s["id"].rsplit("-", 1)[1])) == "eval" for s in ev)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown synthetic category 'cats'"):
        make_sample("cats", 0)
    with pytest.raises(ValueError, match="unknown split"):
        make_dataset(2, "test")
    with pytest.raises(ValueError, match="non-negative"):
        make_sample("shapes", -1)


# -- validity and answer consistency -----------------------------------------------------------
@pytest.mark.parametrize("category", CATEGORIES)
def test_samples_valid(category):
    for seed in SEEDS:
        s = make_sample(category, seed)
        assert set(s) == {"images", "texts", "category", "id", "meta"} and s["category"] == category
        assert len(s["images"]) == (2 if category == "multi_image" else 1)
        for im in s["images"]:
            assert im.mode == "RGB" and all(128 <= d <= 512 for d in im.size), im.size
        assert 1 <= len(s["texts"]) == len(s["meta"]["qa"])
        for t in s["texts"]:
            assert set(t) == {"user", "assistant"} and t["user"].strip() and t["assistant"].strip()
            if category != "caption":
                assert len(t["assistant"].split()) <= 3, t  # short, exact-matchable
        assert len({t["user"] for t in s["texts"]}) == len(s["texts"])  # no repeated question


def _expected(category: str, meta: dict, qa: dict) -> str:
    """Re-derive an answer from what was drawn (meta) alone."""
    t = qa["type"]
    if category in ("shapes", "caption"):
        shapes = meta["shapes"]
        of = lambda k: [s for s in shapes if s["kind"] == k]  # noqa: E731
        by_colour = {s["colour"]: s for s in shapes}
        cx = lambda s: (s["box"][0] + s["box"][2]) / 2  # noqa: E731
        cy = lambda s: (s["box"][1] + s["box"][3]) / 2  # noqa: E731
        if t == "count":
            return str(len(of(qa["kind"])))
        if t == "count_all":
            return str(len(shapes))
        if t == "colour":
            (s,) = of(qa["kind"])
            return s["colour"]
        if t == "left_of":
            return "yes" if cx(by_colour[qa["a"]]) < cx(by_colour[qa["b"]]) else "no"
        if t == "above":
            return "yes" if cy(by_colour[qa["a"]]) < cy(by_colour[qa["b"]]) else "no"
        if t == "bigger":
            (a,), (b,) = of(qa["a"]), of(qa["b"])
            return qa["a"] if a["box"][2] - a["box"][0] > b["box"][2] - b["box"][0] else qa["b"]
        if t == "side":
            (s,) = of(qa["kind"])
            return _COLS[s["cell"][1]]
        if t == "vside":
            (s,) = of(qa["kind"])
            return ("top", "middle", "bottom")[s["cell"][0]]
        if t == "where":  # spelled out per cell, independently of scenes.where_words
            (s,) = of(qa["kind"])
            return [["top left", "top", "top right"], ["left", "centre", "right"],
                    ["bottom left", "bottom", "bottom right"]][s["cell"][0]][s["cell"][1]]
        if t == "what":
            (s,) = shapes
            return f"a {s['colour']} {s['kind']}"
    if category == "multi_image":
        counts = [sum(s["kind"] == qa.get("kind") for s in p["shapes"]) for p in meta["panels"]]
        if t == "more":
            return "first" if counts[0] > counts[1] else "second"
        if t == "count_in":
            return str(counts[qa["image"]])
        if t == "same_background":
            return "yes" if meta["panels"][0]["background"] == meta["panels"][1]["background"] else "no"
    if category == "text":
        lines = meta["lines"]
        return {"read": lambda: lines[0], "read_line": lambda: lines[qa.get("line", 0)],
                "n_lines": lambda: str(len(lines)),
                "number": lambda: next(x for x in lines if x.isdigit())}[t]()
    if category == "chart":
        lab, val = meta["labels"], meta["values"]
        return {"value": lambda: str(val[lab.index(qa.get("label"))]), "largest": lambda: lab[val.index(max(val))],
                "smallest": lambda: lab[val.index(min(val))], "n_bars": lambda: str(len(lab))}[t]()
    if category == "receipt":
        money = lambda c: f"{c / 100:.2f}"  # noqa: E731
        assert meta["total"] == sum(meta["prices"])
        return {"total": lambda: money(meta["total"]), "shop": lambda: meta["shop"], "date": lambda: meta["date"],
                "n_items": lambda: str(len(meta["items"])),
                "price": lambda: money(meta["prices"][meta["items"].index(qa.get("item"))])}[t]()
    if category == "form":
        return meta["fields"][qa["field"]]
    raise AssertionError(f"no checker for {category}/{t}")


@pytest.mark.parametrize("category", [c for c in CATEGORIES if c != "caption"])
def test_answers_match_what_was_drawn(category):
    types = Counter()
    for seed in range(40):
        s = make_sample(category, seed)
        for turn, qa in zip(s["texts"], s["meta"]["qa"]):
            assert turn["assistant"] == _expected(category, s["meta"], qa), (s["id"], turn, qa)
            types[qa["type"]] += 1
    assert len(types) >= 3 if category != "form" else types["field"] > 0  # question variety is exercised


def test_caption_lists_every_shape():
    for seed in SEEDS:
        s = make_sample("caption", seed)
        cap, shapes = s["texts"][0]["assistant"], s["meta"]["shapes"]
        assert f"on a {s['meta']['background']} background:" in cap
        for (colour, kind), n in Counter((x["colour"], x["kind"]) for x in shapes).items():
            assert f"{colour} {kind}" in cap
        assert (len(shapes) == 1) == cap.startswith("One shape")


def test_pixels_agree_with_meta():
    """The drawing really contains what meta (and hence the answers) say."""
    for seed in SEEDS:
        s = make_sample("shapes", seed)
        im = s["images"][0]
        for sh in s["meta"]["shapes"]:
            x, y = (sh["box"][0] + sh["box"][2]) // 2, (sh["box"][1] + sh["box"][3]) // 2
            assert im.getpixel((x, y)) == COLOURS[sh["colour"]], (s["id"], sh)

        c = make_sample("chart", seed)
        im, m = c["images"][0], c["meta"]
        top, bottom = m["axis"][1], m["axis"][3]
        unit = (bottom - top - 20) / m["vmax"]
        for box, v in zip(m["boxes"], m["values"]):
            x = (box[0] + box[2]) // 2
            bar = sum(im.getpixel((x, y)) == COLOURS[m["colour"]] for y in range(top, bottom))
            assert abs(bar - v * unit) <= 1.0, (c["id"], v, bar)  # bar height proportional to value

        t = make_sample("text", seed)
        im, m = t["images"][0], t["meta"]
        for box in m["boxes"]:
            crop = im.crop(box)
            assert any(lo != hi for lo, hi in crop.getextrema())  # not flat background: ink in each line's box


# -- exact match -------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,gold", [
    ("Yes.", "yes"), ("  RED ", "red"), ("three", "3"), ("Twenty-one", "21"), ("$12.50", "12.50"),
    ("12.5", "12.50"), ("1,200", "1200"), ("the circle", "circle"), ("An apple.", "apple"),
    ("2019-08-26", "2019-08-26"), ("007", "7"), ("There are 4.", "there are four"), ("a", "A"),
])
def test_answers_match_equal(pred, gold):
    assert answers_match(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("no", "yes"), ("4", "3"), ("12.05", "12.5"), ("", "A"), ("the", "a"), ("red circle", "red"), ("1200", "120"),
])
def test_answers_match_different(pred, gold):
    assert not answers_match(pred, gold)


def test_normalize_answer_form():
    assert normalize_answer("  The Total is $1,234.50!  ") == "total is 1234.5"


def test_contact_sheet():
    sheet = contact_sheet(make_dataset(8, "eval"), cols=4)
    assert sheet.size == (1600, 2 * 430)
