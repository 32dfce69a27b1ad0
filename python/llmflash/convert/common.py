"""Helpers shared by the converters (Hugging Face folders, GGUF files)."""

from __future__ import annotations

import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, TypeVar

import torch

from .. import store as S
from ..errors import ConvertError

T = TypeVar("T")


def natural_key(s: str) -> list[Any]:
    """Sort key putting layers.2 before layers.10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def regular_file(path: Path) -> bool:
    """True when `path` is a regular file (following symlinks), False when nothing is there.

    Anything else (a FIFO, a device, a socket, a folder) is a ConvertError naming it, raised
    before the file is opened: opening a FIFO for reading blocks until a writer comes, and a
    device such as /dev/zero never ends."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror or e})", path) from None
    if stat.S_ISREG(mode):
        return True
    kind = (
        "a folder"
        if stat.S_ISDIR(mode)
        else "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a special file"
    )
    raise ConvertError(f"not a regular file ({kind})", path)


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr; silent when stderr is not a terminal or LLMFLASH_QUIET is set.

    tqdm is a hard dependency; the bar is disabled (not removed) so callers never branch on it.
    """
    from tqdm.auto import tqdm

    quiet = bool(os.environ.get("LLMFLASH_QUIET")) or not sys.stderr.isatty()
    yield from tqdm(iterable, desc=desc, total=total, unit="layer", disable=quiet, leave=False, dynamic_ncols=True)


def parse_dtype(dtype: str | torch.dtype) -> str:
    """Normalise a user's dtype ('float16', 'fp16', 'half', torch.float16, ...) to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        for name, t in S.DTYPES.items():
            if t == dtype:
                return name
        raise ConvertError(f"unsupported dtype {dtype}; choose one of {sorted(S.DTYPES)}")
    aliases = {
        "fp16": "float16",
        "f16": "float16",
        "half": "float16",
        "bf16": "bfloat16",
        "fp32": "float32",
        "f32": "float32",
        "float": "float32",
    }
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = aliases.get(name, name)
    if name not in S.STORE_DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {', '.join(S.STORE_DTYPES)}")
    return name
