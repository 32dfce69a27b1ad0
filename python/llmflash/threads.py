"""Threads for one-token decode of a large float16 model: torch on one thread, the native
kernels (every float16 product) on the configured count.

On a machine with few cores, torch's OpenMP workers spin for a while after each parallel region
(libgomp's default), and a native kernel (llmflash._native) that starts its second thread right
then fights them for the core, which made the native products slower than torch's. Inside
decode_threads() torch runs on one thread (no workers to spin), and layers.linear sends float16
products to the native kernel with the threads torch was configured with: a large float16 model's
token runs faster than with torch's kernels and threads. Small models are better off with
torch's threads and kernels, so `native_decode` turns this on from a model width of
NATIVE_DECODE_DIM.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

_native: int | None = None  # set while decode_threads() is active
NATIVE_DECODE_DIM = 2048  # model width from which decode runs the products natively
THREADS_PER_CORE = 8  # the most threads `--threads` may ask for, per core of the machine


def max_threads() -> int:
    """The largest thread count calibrate/eval accept: THREADS_PER_CORE per core. More threads than
    cores only slow torch down; tens of thousands crash OpenMP (libgomp segfaults or aborts)."""
    return THREADS_PER_CORE * max(1, os.cpu_count() or 1)


def check_threads(threads: int | None) -> int | None:
    """`threads` checked (an integer in [1, max_threads()]; None keeps torch's setting), so a bad
    count is an InvalidArgumentError before any work rather than a crash inside OpenMP."""
    from .errors import check_int

    return None if threads is None else check_int("threads", threads, 1, max_threads())


def set_threads(threads: int | None) -> None:
    """Give torch `threads` (already checked by check_threads; None: leave torch's setting)."""
    if threads is not None:
        torch.set_num_threads(threads)


def native_decode(dim: int, dtype: torch.dtype) -> bool:
    """Whether one-token decode of a model of this width and dtype runs in decode_threads()."""
    return dtype == torch.float16 and dim >= NATIVE_DECODE_DIM


def in_decode() -> bool:
    """Inside decode_threads(): float16 products go to the native kernel (layers.linear)."""
    return _native is not None


def native_threads() -> int:
    """How many threads a native kernel may use: torch's setting outside decode_threads()."""
    return _native if _native is not None else torch.get_num_threads()


@contextlib.contextmanager
def decode_threads(on: bool = True) -> Iterator[None]:
    """Inside: torch on one thread, native_threads() = torch's thread count outside. Nested or
    `on=False` (a dtype the native kernels do not cover: torch keeps its threads): no change."""
    global _native
    n = torch.get_num_threads()
    if not on or n <= 1 or _native is not None:
        yield
        return
    _native = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _native = None
