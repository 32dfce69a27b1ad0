"""Helpers shared by the converters (Hugging Face folders, GGUF files)."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

import torch

from .. import store as S
from ..errors import ConvertError

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm progress bar on stderr; silent when stderr is not a terminal or LLMFLASH_QUIET is set.

    tqdm is a hard dependency; the bar is disabled (not removed) so callers never branch on it.
    """
    from tqdm.auto import tqdm

    quiet = bool(os.environ.get("LLMFLASH_QUIET")) or not sys.stderr.isatty()
    yield from tqdm(iterable, desc=desc, total=total, unit="layer", disable=quiet, leave=False,
                    dynamic_ncols=True)


def parse_dtype(dtype: str | torch.dtype) -> str:
    """Normalise a user's dtype ('float16', 'fp16', 'half', torch.float16, ...) to a store dtype name."""
    if isinstance(dtype, torch.dtype):
        for name, t in S.DTYPES.items():
            if t == dtype:
                return name
        raise ConvertError(f"unsupported dtype {dtype}; choose one of {sorted(S.DTYPES)}")
    aliases = {"fp16": "float16", "f16": "float16", "half": "float16",
               "bf16": "bfloat16", "fp32": "float32", "f32": "float32", "float": "float32"}
    name = str(dtype).strip().lower().removeprefix("torch.")
    name = aliases.get(name, name)
    if name not in S.DTYPES:
        raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {sorted(S.DTYPES)}")
    return name
