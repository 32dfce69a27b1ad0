"""`llmflash serve [STORE]`: an OpenAI-compatible HTTP server over a store (the embedded default
model without one), with every model option of `generate` and the server's own limits. It binds
its socket before it starts (so a busy port is a clear error, exit code 2, and `--port 0` picks a
free one), says where it listens on stderr, and stops cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import sys
from typing import Any

from ..errors import BudgetError, InvalidArgumentError, StoreError, check_int
from .generate import add_model_options, add_store_argument, flash_options


def register(sub: Any) -> None:
    """Add the `serve` subcommand to the `llmflash` parser's subparsers."""
    s = sub.add_parser("serve", help="serve a store over an OpenAI-compatible HTTP API")
    add_store_argument(s)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--model-name", help="the model's id in the API (default: the store folder's name)")
    add_model_options(s)
    s.add_argument(
        "--queue", type=int, default=16, help="requests that may wait while one is generated (default 16); more: 503"
    )
    s.add_argument("--max-body", default="4MiB", help="largest request body (default 4MiB); larger: 413")
    s.add_argument(
        "--max-prompt-tokens", type=int, help="longest prompt in tokens (default: the model's context); longer: 413"
    )
    s.add_argument(
        "--max-tokens", type=int, help="most tokens one request may ask for (default: what the context leaves)"
    )
    s.add_argument(
        "--timeout", type=float, default=600.0, help="seconds a request may take, queue included (default 600)"
    )
    s.add_argument(
        "--allow-origin", action="append", default=[], metavar="ORIGIN", help="allow browser pages from ORIGIN (CORS)"
    )
    s.add_argument("--quiet", action="store_true", help="no log line per request")
    s.set_defaults(func=run)


def check(args: argparse.Namespace) -> int:
    """The server's own limits, checked before the model is opened; returns --max-body in bytes."""
    from ..budget import parse_memory

    check_int("--port", args.port, 0, 65535)
    check_int("--queue", args.queue, 0)
    for flag in ("max_prompt_tokens", "max_tokens"):
        if getattr(args, flag) is not None:
            check_int(f"--{flag.replace('_', '-')}", getattr(args, flag), 1)
    if not args.timeout > 0:
        raise InvalidArgumentError(f"--timeout must be a positive number of seconds, not {args.timeout}")
    try:
        return parse_memory(args.max_body, 0)
    except BudgetError:
        raise InvalidArgumentError(f"--max-body: cannot parse {args.max_body!r}: use e.g. 4MiB or 100000") from None


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket; an OSError naming the address when it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    import asyncio

    import uvicorn

    from ..api import FlashModel
    from ..serve.app import Settings, create_app

    max_body = check(args)
    model = FlashModel.open(args.store, strategy=args.strategy, device=args.device, **flash_options(args))
    if model.tokenizer is None:
        raise StoreError(
            "this store has no tokenizer.json: a server answers in text (convert with --tokenizer)", model.store.path
        )
    name = args.model_name or model.store.path.name.removesuffix(".llmflash")
    settings = Settings(
        model_name=name,
        queue=args.queue,
        max_body=max_body,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
        timeout=args.timeout,
        allow_origins=tuple(args.allow_origin),
    )
    logging.basicConfig(format="llmflash serve: %(message)s", stream=sys.stderr)
    logging.getLogger("llmflash.serve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    sock = listen(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"
    config = uvicorn.Config(
        create_app(model, settings),
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # ours, below

    async def serve() -> None:
        def stop() -> None:  # the first Ctrl-C or SIGTERM stops gracefully, a second at once
            server.force_exit = server.should_exit
            server.should_exit = True

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop)
        # Said once the signals are ours; the socket already listens, so a client that connects
        # on reading it waits in its backlog until uvicorn takes it.
        print(f"llmflash serve: {name} ({model.strategy}) on {url} (Ctrl-C stops)", file=sys.stderr, flush=True)
        await server.serve(sockets=[sock])

    try:
        asyncio.run(serve())
    finally:
        sock.close()
    print("llmflash serve: stopped", file=sys.stderr)
    return 0
