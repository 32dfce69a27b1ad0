"""`llmflash convert SRC DST`: a Hugging Face folder or a GGUF file into a store (llmflash.convert)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

DTYPES = ("auto", "float16", "bfloat16", "float32", "q8_0", "q4_0", "q4_1")


def register(sub: Any) -> None:
    """Add the `convert` subcommand to the `llmflash` parser's subparsers."""
    c = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file into a store")
    c.add_argument("src", help="HF folder (config.json + *.safetensors) or .gguf file")
    c.add_argument("dst", help="store folder to create")
    c.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="store dtype (default auto: a GGUF's own q8_0/q4_0/q4_1 blocks when its FFN is in one of "
        "them, else float16; float16 for a Hugging Face folder); says what it chose",
    )
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    c.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one) for sources that ship none")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..convert import convert, resolve_dtype

    dtype, chose = args.dtype, ""
    if dtype == "auto":
        dtype, why = resolve_dtype(args.src)
        chose = f" (--dtype auto: {dtype}, {why})"
    dst = convert(args.src, args.dst, dtype=dtype, force=args.force, tokenizer=args.tokenizer)
    print(f"wrote {dst}{chose}", file=sys.stderr)
    return 0
