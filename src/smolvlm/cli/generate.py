"""`smolvlm generate`: answer one prompt (with images and/or a video: `--video PATH [--fps F] [--max-frames N]`),
streaming the text to stdout. The prompt is an argument (or `--prompt TEXT`), or read from a file (`--prompt-file PATH`) or
stdin (`-`). Every flag and input file is checked before the model loads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from smolvlm.cli import common


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", default=None,
                   help="the question or instruction; - reads it from stdin (or use --prompt-file)")
    p.add_argument("--prompt", dest="prompt_option", default=None, metavar="TEXT",
                   help="the prompt as an option (as llama.cpp and mlx-vlm take it), instead of the argument")
    p.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="read the prompt from this UTF-8 text file (- for stdin) instead of the argument")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image file placed before the prompt (repeatable, in order)")
    p.add_argument("--video", default=None, metavar="PATH", help="video file placed after the images, before the prompt")
    v = p.add_argument_group("video sampling (default: the checkpoint's video_sampling, else 1 fps / 64 frames)")
    v.add_argument("--fps", type=float, default=None, metavar="F", help="frames sampled per second of video")
    v.add_argument("--max-frames", type=int, default=None, metavar="N", help="at most N frames per video")
    common.add_allow_remote(p)
    common.add_model_args(p)
    common.add_compile_arg(p)
    common.add_generation_args(p)


def read_prompt(prompt: str | None, prompt_file: str | None, prompt_option: str | None = None) -> str:
    """The one prompt source: the argument or ``--prompt TEXT``, ``--prompt-file PATH`` (UTF-8), or stdin
    (``-`` for any). Text from a file or stdin loses its surrounding whitespace (the file's final newline)."""
    if prompt is not None and prompt_option is not None:
        raise common.UserError("give the prompt as an argument or with --prompt, not both")
    prompt = prompt if prompt_option is None else prompt_option
    if prompt is not None and prompt_file is not None:
        raise common.UserError("give the prompt as an argument (or --prompt) or with --prompt-file, not both")
    if prompt is None and prompt_file is None:
        raise common.UserError("no prompt: give it as an argument, as - to read stdin, or with --prompt-file PATH")
    if prompt is not None and prompt != "-":
        return prompt
    source = prompt_file if prompt_file is not None else "-"
    if source == "-":
        where = "the prompt on stdin"
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    else:
        where = f"--prompt-file {source}"
        try:
            data = Path(source).expanduser().read_bytes()
        except OSError as e:
            raise common.UserError(f"cannot read {where}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise common.UserError(f"{where} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text:
        raise common.UserError(f"{where} is empty")
    return text


def build_messages(prompt: str, images: list[Any], video: Any = None) -> list[dict[str, Any]]:
    """One user turn: images (paths or decoded images), then the video, then the text (the usual
    layout for SmolVLM prompts).

    ``video``: a file path, or frames already loaded (``VideoFrames``) which the processor uses as given.
    """
    content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in images]
    if isinstance(video, (str, Path)):
        content.append({"type": "video", "path": str(video)})
    elif video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def run(args: argparse.Namespace) -> int:
    from smolvlm.generation.stream import StreamStats, stream

    common.check_model_args(args)
    common.check_generation_args(args)
    prompt = read_prompt(args.prompt, args.prompt_file, args.prompt_option)
    if args.video is None and (args.fps is not None or args.max_frames is not None):
        raise common.UserError("--fps / --max-frames need --video")
    if args.video is not None and not Path(args.video).expanduser().is_file():
        raise FileNotFoundError(f"video file not found: {args.video}")
    images = [common.check_image(p, args.allow_remote) for p in args.image]
    processor, video, extra = None, None, {}
    if args.video is not None:
        # decode + sample now: a bad video fails before the (slow) model load, and the sampling flags apply
        processor = common.load_processor(args.model)
        video = processor.load_video(Path(args.video).expanduser(), fps=args.fps, max_frames=args.max_frames)
        extra["video_frames"] = len(video.frames)
    messages = build_messages(prompt, images, video)
    model, processor = common.load_model(args, processor)
    stats = StreamStats()
    pieces = stream(model, processor, messages, stats=stats, **common.generation_kwargs(args))
    common.print_answer(pieces, stats, args.json, extra=extra)
    return 0
