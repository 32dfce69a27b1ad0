"""The llmflash exception family. Every error a user can cause from Python (bad paths, corrupt or
hostile stores, unsupported models, a budget that cannot fit, an argument out of range, a chat
template that fails) is one of these, with a message that names the file or option and what is
wrong. The argument errors (InvalidArgumentError, ChatTemplateError, BudgetError) are also
ValueErrors, so `except ValueError` keeps working for them.

The native module raises these same classes (rust/py/errors.rs maps the core's one error enum
onto them: Open/Read/Eof/Write -> FlashIOError, Layout -> StoreError, Invalid/Profile ->
InvalidArgumentError); only a failed allocation is a plain MemoryError, and a wrong argument type
a TypeError. So `except llmflash.LlmflashError` catches every error a user can cause.
"""

from __future__ import annotations

import operator
import os


class LlmflashError(Exception):
    """Base class. `path` is the file the problem is about, when there is one."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = os.fspath(path) if path is not None else None
        super().__init__(f"{self.path}: {message}" if self.path else message)


class StoreError(LlmflashError):
    """A store (manifest.json, resident.safetensors, ffn.bin, predictors) is missing, truncated,
    corrupt (checksum), of an unknown version, or describes offsets/sizes outside its files."""


class ConvertError(LlmflashError):
    """The conversion source is not a model folder or GGUF file, or is malformed."""


class UnsupportedModelError(ConvertError):
    """The source is well formed but its architecture, option or tensor type is not supported."""


class FlashIOError(LlmflashError, OSError):
    """A read from flash failed (I/O error, file shorter than the store says)."""


class BudgetError(LlmflashError, ValueError):
    """The memory budget cannot hold what must stay resident, or cannot be parsed."""


class InvalidArgumentError(LlmflashError, ValueError):
    """An argument or option is malformed or out of range: a sampling setting, a window, a
    sparsity spec, a strategy, a thread count, an empty or out-of-vocabulary prompt."""


def check_int(what: str, v: object, lo: int, hi: int | None = None) -> int:
    """`v` as an int when it is an integer (an int or anything with __index__, such as numpy's;
    not a bool) in [lo, hi] (hi None: no upper bound); otherwise an InvalidArgumentError naming
    `what` and the value."""
    try:
        i = None if isinstance(v, bool) else operator.index(v)
    except TypeError:
        i = None
    if i is None or i < lo or (hi is not None and i > hi):
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidArgumentError(f"{what} must be an integer {span}, not {v!r}")
    return i


class ChatTemplateError(LlmflashError, ValueError):
    """The store's chat template (manifest.json "chat_template") does not parse, fails while
    rendering (including a raise_exception() of its own), or exceeds the rendering limits."""
