"""The argument parser every `llmflash` command uses: argparse, with usage errors raised as
UsageError so the command line prints them like any other bad input, on one line
(`llmflash: error: convert: the following arguments are required: dst (see `llmflash convert
--help`)`), and exits with code 2, instead of argparse's usage block."""

from __future__ import annotations

import argparse
from typing import NoReturn

from ..errors import InvalidArgumentError


class UsageError(InvalidArgumentError):
    """A command line argparse rejected: unknown option, missing or malformed argument."""


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are UsageErrors (subcommand parsers inherit it)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("llmflash").strip()  # "" for the top-level parser
        raise UsageError(f"{command + ': ' if command else ''}{message} (see `{self.prog} --help`)")
