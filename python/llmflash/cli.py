"""The `llmflash` command line. Bad input, usage errors included, prints one line on stderr
(`llmflash: error: ...`) and exits with code 2; `--help` prints the usage."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands import bench, calibrate, profile_disk, verify
from .commands import eval as eval_command
from .commands.args import Parser
from .errors import InvalidArgumentError, LlmflashError
from .heap import bound_heap

DTYPES = ("float16", "bfloat16", "float32")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer)
    print(f"wrote {dst}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .api import FlashModel

    model = FlashModel.open(args.store, strategy=args.strategy, **flash_options(args))
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


def flash_options(args: argparse.Namespace) -> dict:
    """Options for the flash strategy from --memory/--window/--sparsity/--hot (only those given)."""
    opts = {k: getattr(args, k) for k in ("memory", "window", "sparsity", "hot") if getattr(args, k) is not None}
    if opts and args.strategy not in (None, "flash"):
        raise InvalidArgumentError(
            f"--memory/--window/--sparsity/--hot apply to the flash strategy, not {args.strategy!r}"
        )
    return opts


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


# Subcommands with parsers of their own (main(argv) -> exit code), in the order `--help` lists them.
OWN_PARSERS = {"profile-disk": profile_disk, "bench": bench, "calibrate": calibrate, "eval": eval_command}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmflash", description="Run LLMs larger than memory by streaming FFN neurons from flash.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file into a store")
    c.add_argument("src", help="HF folder (config.json + *.safetensors) or .gguf file")
    c.add_argument("dst", help="store folder to create")
    c.add_argument("--dtype", choices=DTYPES, default="float16")
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    c.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one) for sources that ship none")
    c.set_defaults(func=_cmd_convert)

    g = sub.add_parser("generate", help="generate text from a store")
    g.add_argument(
        "store",
        nargs="?",
        default=None,
        help="store folder (default: the embedded SmolLM2-135M-Instruct, converted once into the cache)",
    )
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
    g.add_argument(
        "--strategy",
        choices=("dense", "naive", "flash"),
        help="FFN strategy (default: flash when --memory/--window/--sparsity/--hot is given, else dense)",
    )
    add_flash_flags(g)
    g.add_argument("--stats", action="store_true", help="print timing and I/O counters to stderr")
    g.set_defaults(func=_cmd_generate)

    verify.register(sub)
    for command, module in OWN_PARSERS.items():
        sub.add_parser(command, help=module.HELP, add_help=False)
    return p


def one_line(e: BaseException) -> str:
    """The exception's message on one line (some libraries' messages span several)."""
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    bound_heap()  # the memory promise (heap.py): freed large buffers go back to the system
    try:
        if argv and argv[0] in OWN_PARSERS:
            return OWN_PARSERS[argv[0]].main(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (LlmflashError, ValueError, OSError) as e:
        # Every LlmflashError (whatever else it is), and the ValueError/OSError that bad input
        # causes in the libraries underneath; anything else is a bug and keeps its traceback.
        print(f"llmflash: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
