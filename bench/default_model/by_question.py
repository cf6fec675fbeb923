"""Exact-match counts by question type, side by side for several `smolvlm eval` results files
(run with `--examples` at least the number of questions so that every prediction is kept).

    .venv/bin/python bench/default_model/by_question.py bench/default_model/eval-run4-n200.json \
        bench/default_model/eval-run5-n200.json

Prints a Markdown table: one row per question type (grouped by the question's wording), one column
per file, "right/asked"; captions (ANLS) are left out.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# (category, pattern on the lower-cased question or None for "any", row label); first match wins
GROUPS = [
    ("shapes", r"colou?r", "shapes: colour of the only circle/square/triangle"),
    ("shapes", r"left or the right", "shapes: which side"),
    ("shapes", r"left of|above", "shapes: left of / above"),
    ("shapes", r"how many|count", "shapes: count (all shapes or one kind)"),
    ("shapes", r"bigger|larger|smaller", "shapes: which is bigger"),
    ("text", r"how many lines", "text: how many lines"),
    ("text", None, "text: read a word or number"),
    ("form", None, "form: field value"),
    ("receipt", r"shop", "receipt: shop name"),
    ("receipt", r"how many", "receipt: count lines"),
    ("receipt", None, "receipt: price, total, date"),
    ("chart", r"how many", "chart: count bars"),
    ("chart", None, "chart: bar value, largest, smallest"),
    ("multi_image", None, "multi_image"),
]


def group_of(category: str, question: str) -> str:
    q = question.lower()
    for cat, pattern, label in GROUPS:
        if cat == category and (pattern is None or re.search(pattern, q)):
            return label
    return f"{category}: other"


def tally(path: Path) -> dict[str, list[int]]:
    try:
        data = json.loads(path.read_text())
        data["examples"], data["n_requests"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a readable `smolvlm eval --output` file ({e})") from None
    if len(data["examples"]) < data["n_requests"]:
        raise SystemExit(f"{path}: only {len(data['examples'])} of {data['n_requests']} predictions kept; "
                         f"re-run smolvlm eval with --examples {data['n_requests']}")
    counts: dict[str, list[int]] = {}
    for e in data["examples"]:
        if e["category"] != "caption":
            c = counts.setdefault(group_of(e["category"], e["question"]), [0, 0])
            c[0] += int(e["score"] == 1.0)
            c[1] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", type=Path, help="smolvlm eval --output files")
    args = ap.parse_args()
    tallies = [tally(p) for p in args.results]
    order = [label for _, _, label in GROUPS] + sorted({k for t in tallies for k in t} - {g[2] for g in GROUPS})
    print("| question | " + " | ".join(p.stem for p in args.results) + " |")
    print("|---|" + "---|" * len(args.results))
    for label in order:
        if any(label in t for t in tallies):
            cells = [f"{t[label][0]}/{t[label][1]}" if label in t else "-" for t in tallies]
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
