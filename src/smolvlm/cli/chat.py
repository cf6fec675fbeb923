"""`smolvlm chat`: multi-turn conversation on stdin/stdout, history kept between turns.

Each stdin line is a user turn, except the commands ``/image PATH`` (attach an image to the
next user turn), ``/reset`` (forget the conversation) and ``/quit``. Encoded images are cached
(``FeatureCache``), so earlier images re-sent with the history are not encoded again.

Flags and the checkpoint's processor are checked at start; the model loads at the first user
turn, so a bad ``/image`` (decoded when given) or an early ``/quit`` costs no model load.
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
    common.add_allow_remote(p)
    common.add_model_args(p)
    common.add_compile_arg(p)
    common.add_generation_args(p)


@dataclass
class ChatSession:
    """Conversation state: message history and images waiting for the next user turn."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    pending_images: list[Any] = field(default_factory=list)  # paths, or decoded images (URLs)

    def reset(self) -> None:
        self.messages.clear()
        self.pending_images.clear()

    def history(self) -> list[dict[str, Any]]:
        sys_msg = [{"role": "system", "content": [{"type": "text", "text": self.system}]}] if self.system else []
        return sys_msg + self.messages

    def add_user(self, text: str) -> None:
        content = [{"type": "image", "image": p} for p in self.pending_images] + [{"type": "text", "text": text}]
        self.messages.append({"role": "user", "content": content})
        self.pending_images = []

    def add_assistant(self, text: str) -> None:
        # The template writes "Assistant: " itself; the model's leading space would double it.
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": text.strip()}]})


def handle_command(session: ChatSession, line: str, err: TextIO, allow_remote: bool = False) -> bool | None:
    """Apply a /command. Returns False to quit, True if handled, None if the line is not a command."""
    cmd, _, arg = line.partition(" ")
    if cmd in ("/quit", "/exit"):
        return False
    if cmd == "/reset":
        session.reset()
        print("(conversation reset)", file=err)
        return True
    if cmd == "/image":
        src = arg.strip()
        if not src:
            print("usage: /image PATH", file=err)
            return True
        try:
            session.pending_images.append(common.check_image(src, allow_remote, what="/image"))
        except (ValueError, OSError) as e:  # missing, empty, corrupt, not an image, too large, a URL
            print(f"error: {e}", file=err)
        else:
            print(f"(image {Path(src).name} attached to your next message)", file=err)
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
    common.check_model_args(args)
    common.check_generation_args(args)
    processor = common.load_processor(args.model)  # a bad --model fails now, in a second
    model = None  # loaded at the first user turn
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
        handled = handle_command(session, line, err, args.allow_remote)
        if handled is False:
            return 0
        if handled:
            continue
        if model is None:
            model, processor = common.load_model(args, processor, err)
        session.add_user(line)
        stats = StreamStats()
        pieces = stream(model, processor, session.history(), stats=stats, feature_cache=cache,
                        **common.generation_kwargs(args))
        try:
            common.print_answer(pieces, stats, args.json, out)
        except BrokenPipeError:
            raise  # stdout closed: main exits quietly
        except (ValueError, OSError) as e:
            # e.g. the conversation outgrew the context: report, drop the turn, keep chatting
            session.messages.pop()
            print(f"error: {e}", file=err, flush=True)
            continue
        session.add_assistant(stats.text)
