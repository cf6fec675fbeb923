"""The `smolvlm` command: one table of subcommands; parsing and dispatch only.

Each command lives in its own module exposing ``register(parser)`` (add arguments) and
``run(args) -> int``. Errors that are the user's (bad file, bad flag, missing weights) are
raised as ``UserError`` (or the library's ``ValueError``/``OSError`` with a clear message) and
printed as one line, exit code 2.

When stdout is closed early (``smolvlm tokens IMG | head -1``) the command stops quietly with exit
code 141, what a shell reports for a command killed by SIGPIPE (128 + 13), as ``yes | head`` does.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import import_module

from smolvlm.cli.common import UserError

EXIT_BROKEN_PIPE = 141

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("smolvlm.cli.doctor", "check the installation and print versions"),
    "train": ("smolvlm.cli.train", "fine-tune or train a model from a YAML recipe (full, frozen parts, LoRA; resumable)"),
    "generate": ("smolvlm.cli.generate", "answer one prompt about images/video, streaming the text"),
    "chat": ("smolvlm.cli.chat", "interactive multi-turn chat on stdin (/image PATH, /reset, /quit)"),
    "serve": ("smolvlm.cli.serve", "OpenAI-compatible HTTP server (/v1/chat/completions, streaming, images, video)"),
    "tokens": ("smolvlm.cli.tokens", "count tiles and prompt tokens for images (no model needed)"),
    "eval": ("smolvlm.cli.eval", "score a model on benchmarks (DocVQA, MMMU, Video-MME, ...) or the synthetic set; score predictions; reports"),
    "export-default": ("smolvlm.cli.export_default", "write the built-in default model as a standard checkpoint folder"),
    "ship-default": ("smolvlm.cli.ship_default", "package a finished default-model training run as the built-in model"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command; ``only``: register that command's flags alone (the others keep
    their help line), so that running one command does not import the others (``eval`` imports torch)."""
    parser = argparse.ArgumentParser(prog="smolvlm", description="SmolVLM vision-language models in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if only is None or name == only:
            mod = import_module(module)
            mod.register(p)
            p.set_defaults(_run=mod.run)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not hit the closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout is not a file (e.g. a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)  # the top level has no other flags
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        rc = int(args._run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in Python's flush at exit
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (UserError, ValueError, OSError) as e:
        # UserError, and ValueError/OSError from the library's validation, carry a clear message; no traceback.
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"smolvlm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
