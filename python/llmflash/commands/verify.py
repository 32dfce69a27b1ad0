"""`llmflash verify STORE`: the command line of the whole-store check (llmflash.verify): its
arguments and its one-line report on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the `verify` subcommand to the `llmflash` parser's subparsers."""
    v = sub.add_parser(
        "verify",
        help="check a whole store: every layer region's and bundle's CRC-32, resident tensors, tokenizer, predictors",
    )
    v.add_argument("store", help="store folder")
    v.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..verify import verify_store

    r = verify_store(args.store, progress=not args.quiet)
    print(r.summary(), file=sys.stderr)
    return 0
