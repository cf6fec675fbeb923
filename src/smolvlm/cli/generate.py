"""`smolvlm generate`: answer one prompt (with images or a video), streaming the text to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the question or instruction")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file placed before the prompt (repeatable, in order)")
    p.add_argument("--video", default=None, metavar="PATH", help="video file placed before the prompt")
    common.add_model_args(p)
    common.add_generation_args(p)


def build_messages(prompt: str, images: list[str], video: str | None) -> list[dict[str, Any]]:
    """One user turn: images, then the video, then the text (the usual layout for SmolVLM prompts)."""
    content: list[dict[str, Any]] = [{"type": "image", "path": p} for p in images]
    if video is not None:
        content.append({"type": "video", "path": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def run(args: argparse.Namespace) -> int:
    from smolvlm.generation.stream import StreamStats, normalize_messages, stream

    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise FileNotFoundError(f"video file not found: {args.video}")
    messages = build_messages(args.prompt, args.image, args.video)
    normalize_messages(messages)  # fail on a missing image before the (slow) model load
    common.setup_torch(args)
    model, processor = common.load_model_and_processor(args.model, args.dtype, args.device)
    stats = StreamStats()
    pieces = stream(model, processor, messages, stats=stats, **common.generation_kwargs(args))
    if args.json:
        for _ in pieces:
            pass
        common.print_json(stats)
    else:
        common.write_stream(pieces)
    return 0
