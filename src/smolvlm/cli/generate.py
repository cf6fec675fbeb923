"""`smolvlm generate`: answer one prompt (with images and/or a video: `--video PATH [--fps F] [--max-frames N]`),
streaming the text to stdout."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the question or instruction")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file placed before the prompt (repeatable, in order)")
    p.add_argument("--video", default=None, metavar="PATH", help="video file placed after the images, before the prompt")
    v = p.add_argument_group("video sampling (default: the checkpoint's video_sampling, else 1 fps / 64 frames)")
    v.add_argument("--fps", type=float, default=None, metavar="F", help="frames sampled per second of video")
    v.add_argument("--max-frames", type=int, default=None, metavar="N", help="at most N frames per video")
    common.add_model_args(p)
    common.add_generation_args(p)


def build_messages(prompt: str, images: list[str], video: Any = None) -> list[dict[str, Any]]:
    """One user turn: images, then the video, then the text (the usual layout for SmolVLM prompts).

    ``video``: a file path, or frames already loaded (``VideoFrames``) which the processor uses as given.
    """
    content: list[dict[str, Any]] = [{"type": "image", "path": p} for p in images]
    if isinstance(video, (str, Path)):
        content.append({"type": "video", "path": str(video)})
    elif video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def run(args: argparse.Namespace) -> int:
    from smolvlm.generation.stream import StreamStats, normalize_messages, stream

    if args.video is None and (args.fps is not None or args.max_frames is not None):
        raise ValueError("--fps / --max-frames need --video")
    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise FileNotFoundError(f"video file not found: {args.video}")
    normalize_messages(build_messages(args.prompt, args.image))  # fail on a missing image before loading anything
    processor, video, extra = None, None, {}
    if args.video is not None:
        # decode + sample now: a bad video fails before the (slow) model load, and the sampling flags apply
        processor = common.load_processor(args.model)
        video = processor.load_video(Path(args.video).expanduser(), fps=args.fps, max_frames=args.max_frames)
        extra["video_frames"] = len(video.frames)
    messages = build_messages(args.prompt, args.image, video)
    common.setup_torch(args)
    model, processor = common.load_model_and_processor(args.model, args.dtype, args.device, processor=processor,
                                                         quantize=args.quantize)
    stats = StreamStats()
    pieces = stream(model, processor, messages, stats=stats, **common.generation_kwargs(args))
    if args.json:
        for _ in pieces:
            pass
        common.print_json(stats, extra=extra)
    else:
        common.write_stream(pieces)
    return 0
