"""`smolvlm chat`: multi-turn conversation on stdin/stdout, history kept between turns.

Each stdin line is a user turn, except the commands ``/image PATH`` (attach an image to the
next user turn), ``/reset`` (forget the conversation) and ``/quit``. Encoded images are cached
(``FeatureCache``), so earlier images re-sent with the history are not encoded again.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from smolvlm.cli import common

HELP = "commands: /image PATH (attach to next message), /reset (new conversation), /quit"


def register(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, metavar="TEXT", help="optional system message")
    common.add_model_args(p)
    common.add_generation_args(p)


@dataclass
class ChatSession:
    """Conversation state: message history and images waiting for the next user turn."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending_images: list[str] = field(default_factory=list)

    def reset(self) -> None:
        self.messages.clear()
        self.pending_images.clear()

    def history(self) -> list[dict[str, Any]]:
        sys_msg = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return sys_msg + self.messages

    def add_user(self, text: str) -> None:
        content = [{"type": "image", "path": p} for p in self.pending_images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.pending_images = []

    def add_assistant(self, text: str) -> None:
        # The template writes "Assistant: " itself; the model's leading space would double it.
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text.strip()}]})


def handle_command(session: ChatSession, line: str, err: TextIO) -> bool | None:
    """Apply a /command. Returns False to quit, True if handled, None if the line is not a command."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        session.reset()
        print("(conversation reset)", file=err)
        return True
    if cmd == "/image":
        path = Path(arg.strip()).expanduser()
        if not arg.strip():
            print("usage: /image PATH", file=err)
        elif not path.is_file():
            print(f"error: image file not found: {path}", file=err)
        else:
            session.pending_images.append(str(path))
            print(f"(image {path.name} attached to your next message)", file=err)
        return True
    if cmd in ("/help", "/?"):
        print(HELP, file=err)
        return True
    if cmd.startswith("/") and " " not in cmd and len(cmd) > 1 and cmd[1:].isalpha():
        print(f"unknown command {cmd}; {HELP}", file=err)
        return True
    return None


def run(args: argparse.Namespace, stdin: TextIO | None = None, out: TextIO | None = None,
        err: TextIO | None = None) -> int:
    from smolvlm.generation.feature_cache import FeatureCache
    from smolvlm.generation.stream import StreamStats, stream

    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    common.setup_torch(args)
    model, processor = common.load_model_and_processor(args.model, args.dtype, args.device, quantize=args.quantize)
    session, cache = ChatSession(system=args.system), FeatureCache()
    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=err)
    while True:
        if interactive:
            print("you> ", end="", file=err, flush=True)
        line = stdin.readline()
        if not line:
            return 0  # end of input
        line = line.rstrip("\n").strip()
        if not line:
            continue
        handled = handle_command(session, line, err)
        if handled is False:
            return 0
        if handled:
            continue
        session.add_user(line)
        stats = StreamStats()
        pieces = stream(model, processor, session.history(), stats=stats, feature_cache=cache,
                        **common.generation_kwargs(args))
        try:
            if args.json:
                for _ in pieces:
                    pass
                common.print_json(stats, out)
            else:
                common.write_stream(pieces, out)
        except (ValueError, OSError) as e:
            # e.g. the conversation outgrew the context: report, drop the turn, keep chatting
            session.messages.pop()
            print(f"error: {e}", file=err, flush=True)
            continue
        session.add_assistant(stats.text)
