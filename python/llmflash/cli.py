"""The `llmflash` command line: the top-level parser and the dispatch to the verbs, each of which
lives in llmflash.commands (convert, generate, serve and verify register with this parser; calibrate,
place, eval, bench and profile-disk parse their own arguments). Bad input, usage errors included, prints
one line on stderr (`llmflash: error: ...`) and exits with code 2; `--help` prints the usage."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .commands import bench, calibrate, convert, generate, place, profile_disk, serve, verify
from .commands import eval as eval_command
from .commands.args import Parser
from .errors import LlmflashError
from .heap import bound_heap

# Subcommands with parsers of their own (main(argv) -> exit code), in the order `--help` lists them.
OWN_PARSERS = {
    "profile-disk": profile_disk,
    "bench": bench,
    "calibrate": calibrate,
    "place": place,
    "eval": eval_command,
}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="llmflash", description="Run LLMs larger than memory by streaming FFN neurons from flash.")
    sub = p.add_subparsers(dest="command", required=True)

    convert.register(sub)
    generate.register(sub)
    serve.register(sub)
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
