"""`smolvlm serve`: the OpenAI-compatible HTTP server (``smolvlm.serving``) under uvicorn.

Flags are checked and the port is bound before the model loads, so a bad flag or a port in use
fails in a second. The key comes from ``--api-key`` or ``SMOLVLM_API_KEY`` (the environment keeps
it out of ``ps``). The server binds loopback unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Any

from smolvlm.cli import common

API_KEY_ENV = "SMOLVLM_API_KEY"


def register(p: argparse.ArgumentParser) -> None:
    common.add_model_args(p)
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one, printed)")
    s.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and the web page / "
                        f"(or set {API_KEY_ENV}, which keeps the key out of ps)")
    s.add_argument("--max-batch", type=int, default=4, metavar="N",
                   help="requests decoded together at most (KV cache rows; default: 4)")
    s.add_argument("--max-context", type=int, default=None, metavar="N",
                   help="tokens per request, prompt + answer (default: min(2048, the model's limit))")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests waiting for a row before new ones get 429 (default: 64)")
    s.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image/video URLs (default: data: URIs only)")
    s.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                   help="largest request body, images included (default: 32; larger gets 413)")
    s.add_argument("--max-media-mb", type=float, default=20.0, metavar="MB",
                   help="largest single image or video, decoded or downloaded (default: 20)")
    s.add_argument("--media-timeout", type=float, default=10.0, metavar="S",
                   help="seconds allowed for one remote image/video download (default: 10)")


def check_args(args: argparse.Namespace) -> None:
    common.check_model_args(args)
    if not 0 <= args.port <= 65535:
        raise common.UserError(f"--port must be in [0, 65535], got {args.port}")
    for name in ("max_batch", "max_context"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise common.UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.max_queue < 0:
        raise common.UserError(f"--max-queue must be >= 0, got {args.max_queue}")
    for name in ("max_body_mb", "max_media_mb", "media_timeout"):
        if not getattr(args, name) > 0:
            raise common.UserError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (IPv4 or IPv6), or a one-line error."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, type_, proto)
    except OSError as e:
        raise common.UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise common.UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from smolvlm.generation.engine import in_passing_thread
    from smolvlm.serving.app import ServerConfig, create_app
    from smolvlm.serving.media import MB, MediaLimits

    check_args(args)
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise common.UserError(f"the API key (--api-key or {API_KEY_ENV}) is empty")
    sock = bind(args.host, args.port)
    try:
        if not is_loopback(args.host) and key is None:
            print(f"smolvlm serve: warning: listening on {args.host} without an API key: anyone who can reach "
                  f"this port can use the model (set {API_KEY_ENV} or --api-key)", file=sys.stderr)
        config = ServerConfig(
            model_id=args.model or "default", api_key=key, max_batch=args.max_batch, max_context=args.max_context,
            max_queue=args.max_queue, max_body_bytes=int(args.max_body_mb * MB),
            media=MediaLimits(int(args.max_media_mb * MB), args.media_timeout, args.allow_remote_media))

        loaded: dict[str, str] = {}

        def build() -> Any:  # model, packing and the KV cache off the main thread (engine.py, "Threads")
            from smolvlm.model.packed import pack_pending

            model, processor = common.load_model(args, batched=True)  # the engine decodes many rows a step
            loaded["dtype"] = str(model.dtype).removeprefix("torch.")  # what --dtype auto picked
            pack_pending(model)  # layers otherwise pack on first use: not inside the first requests
            try:
                return create_app(model, processor, config)
            except ValueError as e:  # e.g. --max-context above the model's limit
                raise common.UserError(str(e)) from None

        app = in_passing_thread(build)
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        print(f"smolvlm serve: {config.model_id} ({loaded['dtype']}) on http://{url_host}:{port} (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
