"""`llmflash generate [STORE]`: text from a store (the embedded default model without one), with
the dense, naive or flash strategy and flash's budget, window, sparsity and hot options."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InvalidArgumentError


def register(sub: Any) -> None:
    """Add the `generate` subcommand to the `llmflash` parser's subparsers."""
    g = sub.add_parser("generate", help="generate text from a store")
    add_store_argument(g)
    g.add_argument("-p", "--prompt", help="prompt text (default: read stdin)")
    g.add_argument("-n", type=int, default=128, help="maximum new tokens (default 128)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); finite, >= 0")
    g.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus sampling: keep the most likely tokens up to this total probability, in [0, 1] "
        "(default 1: no cut; 0: the top token only)",
    )
    g.add_argument("--seed", type=int, default=None)
    add_model_options(g)
    g.add_argument("--stats", action="store_true", help="print timing and I/O counters to stderr")
    g.set_defaults(func=run)


def add_store_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "store",
        nargs="?",
        default=None,
        help="store folder (default: the embedded SmolLM2-135M-Instruct, converted once into the cache)",
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--strategy, the flash flags and --device: how a command that runs the model opens it."""
    p.add_argument(
        "--strategy",
        choices=("dense", "naive", "flash"),
        help="FFN strategy (default: flash when --memory/--window/--sparsity/--hot is given, else dense)",
    )
    add_flash_flags(p)
    p.add_argument(
        "--device",
        default="cpu",
        help="where the weights live and the math runs: cpu (default), cuda, cuda:N or auto (cuda when torch "
        "sees one); --memory is then GPU memory",
    )


def add_flash_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory", help="DRAM for weights: e.g. 150MB, 1.5GiB, 0.5x or 50%% of the model (flash)")
    p.add_argument(
        "--window", type=int, metavar="K", help="keep neurons wanted in the last K tokens, K >= 0 (flash, default 4)"
    )
    p.add_argument("--sparsity", help="wanted neurons: predictor[:RECALL[/STAY]], oracle[:KEEP] or all (flash)")
    p.add_argument(
        "--hot",
        type=float,
        metavar="SHARE",
        help="pin that share of each layer's neurons (the most often active in calibration) in DRAM, "
        "always computed; the predictors cover the rest (flash, needs calibrated predictors)",
    )


def flash_options(args: argparse.Namespace) -> dict:
    """Options for the flash strategy from --memory/--window/--sparsity/--hot (only those given)."""
    opts = {k: getattr(args, k) for k in ("memory", "window", "sparsity", "hot") if getattr(args, k) is not None}
    if opts and args.strategy not in (None, "flash"):
        raise InvalidArgumentError(
            f"--memory/--window/--sparsity/--hot apply to the flash strategy, not {args.strategy!r}"
        )
    return opts


def run(args: argparse.Namespace) -> int:
    from ..api import FlashModel

    model = FlashModel.open(args.store, strategy=args.strategy, device=args.device, **flash_options(args))
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    pieces = model.generate(
        prompt,
        max_new_tokens=args.n,
        stream=True,
        chat=args.chat,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        for k, v in model.stats().items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", file=sys.stderr)
    return 0
