"""The C heap under the memory promise (peak RSS = budget + fixed overheads, README).

glibc's malloc raises its mmap threshold each time a large block is freed (up to 32 MiB), so
after the first few large temporaries, later ones of that size come from the heap, and the heap
keeps the holes they leave between longer-lived blocks: loading a 30 MB predictors file, whose
packing allocates a few MB per layer, left about 200 MB of heap behind. A fixed threshold of
MMAP_THRESHOLD sends every block that large to its own mapping, returned to the system when
freed, which keeps the heap near what is live (the same load: 70 MB). `bound_heap` sets it once
per process, when the command line starts or a FlashModel is opened (it is process-wide: a host
application that embeds llmflash gets it too; set MALLOC_MMAP_THRESHOLD_ or GLIBC_TUNABLES's
glibc.malloc.mmap_threshold to keep a threshold of your own, which is then left alone); `trim`
hands the heap's free memory back after a load. Both do nothing where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

MMAP_THRESHOLD = 1 << 20  # bytes: blocks this large get their own mapping
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
_done = False


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc has both; musl has neither
    except (OSError, AttributeError):
        return None
    return libc


def bound_heap() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD (once); True when it was set here."""
    global _done
    if _done:
        return False
    _done = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = _libc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


def trim() -> None:
    """Return the heap's free memory to the system (after loading a model: its temporaries)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
