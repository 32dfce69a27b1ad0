"""The llmflash exception family. Every error a user can cause (bad paths, corrupt or hostile
stores, unsupported models, a budget that cannot fit) is one of these, with a message that names
the file and what is wrong. The native module raises these same classes (rust/py/errors.rs maps
the core's one error enum onto them), so `except llmflash.LlmflashError` catches everything.
"""

from __future__ import annotations

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
