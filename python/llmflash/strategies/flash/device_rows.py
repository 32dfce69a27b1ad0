"""Flash with its slot matrices on a GPU (FlashOptions.device other than the CPU).

Each layer's cache rows are a (capacity, bundle_values) tensor in GPU memory under the budget;
the Rust cache keeps only the index (NeuronCache(external_rows=True)). Per admission the host
learns what to do to those rows and does it on the device:
  - the eviction moves (Admission.moves: rows[dst] = rows[src], the paper's swap-delete), one
    batched gather-scatter on the GPU before any row is used;
  - the fill: its bundles land, read and CRC-checked, in a host buffer of their own (row k for
    filled_rows[k]); after the wait they go up and into their rows (Uploader);
  - the overflow: streamed through the host scratch area as on the CPU, each chunk sent up into
    a device scratch of the same rows before its FFN runs (Uploader).

Uploader: host rows go up through two page-locked chunks (bounded host memory, whatever the
fill's size) on a copy stream of their own, each chunk's copy scattered into its rows there. The
ordering, which the CPU tests check with a recording backend:
  - the copy stream first waits for the compute stream: the moves and every FFN enqueued before
    (which may still read the rows or the scratch being overwritten) come first;
  - a chunk is refilled on the host only after the copy that last read it has finished;
  - the compute stream waits for the last copy before it runs anything after the upload.
The predictors run on the host (a layer's FFN input comes down: D values), so their memory is
host memory, still counted in the budget. Lookahead works as on the CPU: a layer's admission
started early has its moves applied at once, and a guess's fill goes up before the check at the
layer admits the true set. Quantized stores run on the CPU only.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from ...errors import InvalidArgumentError
from ...io import Admission, AlignedBuf, NeuronCache


def check_device_options(store: Any, device: torch.device) -> None:
    """What flash cannot do on a GPU yet: an InvalidArgumentError naming it."""
    if store.quant:
        raise InvalidArgumentError(
            f"flash on {device}: a quantized store runs on the CPU only so far: use --device cpu", store.path
        )


def apply_moves(rows: Tensor, adm: Admission) -> int:
    """Apply the admission's eviction moves to the device rows; the number of rows moved. One
    admission's moves never read a row an earlier one wrote nor write one twice (one batched
    copy); moves left by a failed admission come first and may, so then they go one by one."""
    dst, src = adm.moves
    if not len(dst):
        return 0
    if np.unique(dst).size < len(dst) or np.intersect1d(dst, src).size:
        for d, s in zip(dst.tolist(), src.tolist()):
            rows[d] = rows[s]
    else:
        rows[torch.from_numpy(dst).to(rows.device)] = rows[torch.from_numpy(src).to(rows.device)]
    return len(dst)


class SyncBackend:
    """No streams: every copy done when enqueued (a device without streams, and the CPU)."""

    def pinned(self, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype)

    def copy_waits_for_compute(self) -> None:
        pass

    def on_copy_stream(self) -> Any:
        return contextlib.nullcontext()

    def record(self) -> Any:
        return None

    def host_wait(self, event: Any) -> None:
        pass

    def compute_waits(self, event: Any) -> None:
        pass


class CudaBackend(SyncBackend):
    """A copy stream beside the compute (current) stream, events between them, page-locked
    host chunks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pinned(self, shape: tuple[int, int], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy_waits_for_compute(self) -> None:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def on_copy_stream(self) -> Any:
        return torch.cuda.stream(self.stream)

    def record(self) -> Any:
        return self.stream.record_event()

    def host_wait(self, event: Any) -> None:
        event.synchronize()

    def compute_waits(self, event: Any) -> None:
        torch.cuda.current_stream(self.device).wait_event(event)


class Uploader:
    """Host rows -> rows of a device tensor, through two page-locked chunks of `chunk_rows`
    rows on a copy stream (the module docstring gives the ordering)."""

    def __init__(self, device: torch.device, width: int, dtype: torch.dtype, chunk_rows: int, backend: Any = None):
        self.device = device
        self.b = backend if backend is not None else CudaBackend(device) if device.type == "cuda" else SyncBackend()
        self.chunks = [self.b.pinned((max(1, chunk_rows), width), dtype) for _ in range(2)]
        self.done: list[Any] = [None, None]  # the event of the copy that last read each chunk
        self.next = 0
        self.rows_up = 0

    @property
    def host_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def upload(self, dst: Tensor, rows: np.ndarray, host: Tensor) -> int:
        """dst[rows[i]] = host[i] for every i (rows: int64, distinct); the rows sent up."""
        k = len(rows)
        if not k:
            return 0
        self.b.copy_waits_for_compute()
        step, last = self.chunks[0].shape[0], None
        for a in range(0, k, step):
            n = min(step, k - a)
            c = self.chunks[self.next]
            if self.done[self.next] is not None:
                self.b.host_wait(self.done[self.next])  # its last copy has read it
            c[:n].copy_(host[a : a + n])
            with self.b.on_copy_stream():
                up = c[:n].to(self.device, non_blocking=True)
                dst.index_copy_(0, torch.from_numpy(rows[a : a + n]).to(self.device, non_blocking=True), up)
                last = self.done[self.next] = self.b.record()
            self.next ^= 1
        self.b.compute_waits(last)
        self.rows_up += k
        return k


def land(
    up: Uploader, rows: Tensor, cache: NeuronCache, adm: Admission, view: Callable[[AlignedBuf, int], Tensor]
) -> int:
    """After the wait: the fill's bundles into their device rows (`view`: a host buffer's first
    k bundles as a tensor), then marked taken; the bundles sent up. If the upload fails they stay
    untaken, so the next admission drops their neurons instead of trusting rows never written."""
    buf = cache.landed()
    if buf is None:
        return 0
    n = up.upload(rows, np.asarray(adm.filled_rows, dtype=np.int64), view(buf, adm.misses))
    cache.take_landed()
    return n
