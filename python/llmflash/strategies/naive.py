"""`naive`: the paper's baseline. Every token reads each layer's whole FFN region from flash with
direct I/O (no cache, no page cache) and computes the dense FFN on it.

The paper's baseline reloads the whole model per token; ours keeps attention resident and
streams only the FFN, so it is the stronger baseline. Reads go through the same Rust reader as
`flash` (1 MiB requests, 32 in flight: the device's sweet spot in DESIGN §3), into one reusable
aligned buffer sized for the largest layer: DRAM for the FFN is one layer at a time.

Each region's CRC-32 (manifest) is checked the first time the region is read, so a corrupt
ffn.bin is a StoreError, not wrong logits (zlib.crc32, ~5.7 GB/s here: 1.5 s once for
OPT-6.7B's 8.59 GB, then never again; benches take it in their untimed warm-up).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..io import ALIGN, AlignedBuf, Reader, as_tensor
from ..store import Store
from .base import rows_ffn

PIECE = 1 << 20          # request size: 1 MiB reads reach ~2 GB/s at 32 in flight here


class NaiveFFN:
    name = "naive"

    def __init__(self, store: Store, concurrency: int = 32, verify: bool = True):
        self.store, self.config = store, store.config
        self.unverified = set(range(len(store.layers))) if verify else set()   # layers whose CRC is unchecked
        self.reader = Reader(store.ffn_path, concurrency=concurrency)
        self.buf = AlignedBuf(max(L.region_bytes for L in store.layers))
        self.bytes_view = as_tensor(self.buf)                               # (bytes,) uint8, zero-copy
        self.b1 = store.up_biases()                                         # (n,) float32 fc1 bias (OPT)
        self.io_s = self.compute_s = 0.0
        self.bytes_read = 0

    def _read(self, layer: int) -> Tensor:
        L = self.store.layers[layer]
        reqs = [(L.offset + o, min(PIECE, L.region_bytes - o), self.buf, o)
                for o in range(0, L.region_bytes, PIECE)]
        self.reader.read(reqs)                                              # GIL released
        self.bytes_read += L.region_bytes
        if layer in self.unverified:
            self.store.check_region(layer, memoryview(self.buf)[:L.payload_bytes])
            self.unverified.discard(layer)
        payload = self.bytes_view[:L.payload_bytes].view(self.store.dtype)
        return payload.view(L.n_neurons, -1)                                # (n, bundle_values)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        bundles = self._read(layer)
        t1 = time.perf_counter()
        y = rows_ffn(x, bundles, self.config, self.b1[layer])
        self.io_s += t1 - t0
        self.compute_s += time.perf_counter() - t1
        return y

    def stats(self) -> dict[str, float]:
        return {"ffn_io_s": self.io_s, "ffn_compute_s": self.compute_s, "mgmt_s": 0.0,
                "bytes_read": float(self.bytes_read), "ffn_buffer_bytes": float(self.buf.capacity)}

    def reset_stats(self) -> None:
        self.io_s = self.compute_s = 0.0
        self.bytes_read = 0


assert PIECE % ALIGN == 0
