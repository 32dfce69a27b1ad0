"""The `llmflash` command line. Bad input prints one line on stderr and exits with code 2."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import LlmflashError

DTYPES = ("float16", "bfloat16", "float32")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    dst = convert(args.src, args.dst, dtype=args.dtype, force=args.force, tokenizer=args.tokenizer)
    print(f"wrote {dst}", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .api import FlashModel

    model = FlashModel.open(args.store, strategy=args.strategy)
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    pieces = model.generate(prompt, max_new_tokens=args.n, stream=True, chat=args.chat,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    if args.stats:
        for k, v in model.stats().items():
            print(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}", file=sys.stderr)
    return 0


def _cmd_profile_disk(argv: list[str]) -> int:
    from .profile_disk import main as profile_main

    return profile_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmflash", description="Run LLMs larger than memory by streaming FFN neurons from flash.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a Hugging Face folder or a GGUF file into a store")
    c.add_argument("src", help="HF folder (config.json + *.safetensors) or .gguf file")
    c.add_argument("dst", help="store folder to create")
    c.add_argument("--dtype", choices=DTYPES, default="float16")
    c.add_argument("--force", action="store_true", help="replace DST if it exists")
    c.add_argument("--tokenizer", help="tokenizer.json (or a folder holding one) for sources that ship none")
    c.set_defaults(func=_cmd_convert)

    g = sub.add_parser("generate", help="generate text from a store")
    g.add_argument("store", nargs="?", default=None,
                   help="store folder (default: the embedded SmolLM2-135M-Instruct, converted once into the cache)")
    g.add_argument("-p", "--prompt", help="prompt text (default: read stdin)")
    g.add_argument("-n", type=int, default=128, help="maximum new tokens (default 128)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--strategy", default="dense", help="FFN strategy (default dense)")
    g.add_argument("--stats", action="store_true", help="print timing and I/O counters to stderr")
    g.set_defaults(func=_cmd_generate)

    sub.add_parser("profile-disk", help="measure random direct-I/O read throughput (the paper's Figure 2)",
                   add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "profile-disk":
            return _cmd_profile_disk(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except LlmflashError as e:
        print(f"llmflash: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        print(f"llmflash: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
