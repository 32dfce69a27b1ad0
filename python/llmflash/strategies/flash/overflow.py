"""The process's one overflow-read thread: flash hands it a token's first chunk of overflow reads
(NeuronCache.overflow_reader) as soon as the admission names them, and computes meanwhile.

One thread for the process, first come first served: the reads release the GIL and are bound by
the disk, and every FFN call waits for its own read before it returns (so a chunk never outlives
the scratch area it fills, an interrupted call included); independent models on different threads
take turns on it. A forked child gets its own thread (the parent's does not exist there).
"""

from __future__ import annotations

import os
import threading
from concurrent import futures

_worker: tuple[int, futures.ThreadPoolExecutor] | None = None
_worker_lock = threading.Lock()


def overflow_worker() -> futures.ThreadPoolExecutor:
    """The process's one overflow-read thread (a forked child gets its own): the reads release
    the GIL, so they run while the calling thread computes."""
    global _worker
    with _worker_lock:
        if _worker is None or _worker[0] != os.getpid():
            _worker = (os.getpid(), futures.ThreadPoolExecutor(1, thread_name_prefix="llmflash-overflow"))
        return _worker[1]
