"""The `smolvlm` command: one table of subcommands; parsing and dispatch only.

Each command lives in its own module exposing ``register(parser)`` (add arguments) and
``run(args) -> int``. Errors that are the user's (bad file, bad flag, missing weights) are
raised as ``UserError`` and printed as one line, exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("smolvlm.cli.doctor", "check the installation and print versions"),
    "train": ("smolvlm.cli.train", "fine-tune or train a model from a YAML recipe (full, frozen parts, LoRA; resumable)"),
    "generate": ("smolvlm.cli.generate", "answer one prompt about images/video, streaming the text"),
    "chat": ("smolvlm.cli.chat", "interactive multi-turn chat on stdin (/image PATH, /reset, /quit)"),
    "tokens": ("smolvlm.cli.tokens", "count tiles and prompt tokens for images (no model needed)"),
    "eval": ("smolvlm.cli.eval", "evaluate a model on the held-out synthetic set (exact match per category)"),
    "export-default": ("smolvlm.cli.export_default", "write the built-in default model as a standard checkpoint folder"),
    "ship-default": ("smolvlm.cli.ship_default", "package a finished default-model training run as the built-in model"),
}


class UserError(Exception):
    """An error caused by input; printed as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smolvlm", description="SmolVLM vision-language models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        mod = import_module(module)
        mod.register(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, FileNotFoundError, ValueError, OSError) as e:
        # ValueError/OSError from our own validation carry a clear message; no traceback.
        print(f"smolvlm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
