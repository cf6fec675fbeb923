"""`smolvlm tokens`: how many tiles and tokens images (and a prompt) cost, without running a model.

The total is the length of the full chat prompt the model would see: the checkpoint's chat
template around one user turn (all images, then ``--prompt``), with the generation prompt.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR_OR_REPO",
                   help="checkpoint directory (or hub repo id) with the processor files; default: the built-in default model")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (or URLs with --allow-remote)")
    p.add_argument("--prompt", default=None, help="user text after the images (default: none)")
    p.add_argument("--no-split", action="store_true", help="do not split images into tiles (global image only)")
    p.add_argument("--no-upscale", action="store_true",
                   help="tile budget: do not upscale small images to the full grid (not the reference default)")
    p.add_argument("--max-tiles", type=int, default=None, metavar="N",
                   help="tile budget: at most N tiles per image, global image not counted (default: no limit)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_allow_remote(p)


def count(args: argparse.Namespace) -> dict[str, Any]:
    """The numbers `smolvlm tokens` prints, as a dict (importable for tests and scripts)."""
    for src in args.images:
        common.check_remote(src, args.allow_remote)
    proc = common.load_processor(args.model, allow_remote=args.allow_remote)
    content: list[dict[str, Any]] = [{"type": "image"} for _ in args.images]
    if args.prompt:
        content.append({"type": "text", "text": args.prompt})
    text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    split = False if args.no_split else None
    result = proc.count_tokens(text, args.images, do_image_splitting=split,
                               no_upscale=getattr(args, "no_upscale", False), max_tiles=getattr(args, "max_tiles", None))
    for name, im in zip(args.images, result["images"]):
        im["image"] = name
    result["image_seq_len"] = proc.image_seq_len
    result["tile_size"] = proc.image_processor.config.max_image_size
    return result


def run(args: argparse.Namespace) -> int:
    r = count(args)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{'image':<32} {'size (WxH)':>11} {'grid':>5} {'tiles':>5} {'tokens':>7}")
    for im in r["images"]:
        grid = f"{im['rows']}x{im['cols']}" if im["rows"] else "-"
        name = im["image"] if len(im["image"]) <= 32 else "..." + im["image"][-29:]
        print(f"{name:<32} {im['width']:>5}x{im['height']:<5} {grid:>5} {im['tiles']:>5} {im['tokens']:>7}")
    print(f"image tokens {r['image_tokens']}, text tokens {r['text_tokens']}, total {r['total_tokens']} "
          f"(tile {r['tile_size']} px, {r['image_seq_len']} tokens per tile)")
    return 0
