"""`naive`: the paper's baseline. Every token reads each layer's whole FFN region from flash with
direct I/O (no cache, no page cache) and computes the dense FFN on it.

The paper's baseline reloads the whole model per token; ours keeps attention resident and
streams only the FFN, so it is the stronger baseline. Reads go through the same Rust reader as
`flash` (1 MiB requests, 32 in flight: the disk's sweet spot, see benches/README.md), into one reusable
aligned buffer sized for the largest layer: DRAM for the FFN is one layer at a time.

Every read is checked: the Rust reader hashes each 1 MiB request as it lands (overlapped with
the requests still in flight) and combines them into the region's CRC-32, compared with the
manifest's `layers[i].crc32` on every token. A corrupt ffn.bin, or one changed under a running
model, is a StoreError naming the file, the layer and the offset, never wrong logits.
`verify_reads=False` skips the hash (the unchecked baseline that benches/bench_naive_verify.py
prices the check against); nothing else should turn it off.

On a GPU (`device`) the checked region goes up into one device buffer sized for the largest
layer, and the FFN runs there; the host keeps only the read buffer (`ffn_buffer_bytes`). A
quantized store runs on the CPU only.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..device import on_cpu, synchronize
from ..errors import InvalidArgumentError
from ..io import ALIGN, AlignedBuf, Reader, as_tensor
from ..store import Store
from .base import q_rows_ffn, rows_ffn

PIECE = 1 << 20  # request size: 1 MiB reads at 32 in flight run at the disk's full speed


class NaiveFFN:
    name = "naive"

    def __init__(
        self,
        store: Store,
        concurrency: int = 32,
        verify_reads: bool = True,
        engine: str = "auto",
        device: torch.device | None = None,
    ):
        self.store, self.config = store, store.config
        dev = self.device = device or torch.device("cpu")
        if store.quant and not on_cpu(dev):
            raise InvalidArgumentError(
                f"a quantized store runs on the CPU only (device {dev} asked): use --device cpu", store.path
            )
        self.verify_reads = verify_reads
        self.reader = Reader(store.ffn_path, concurrency=concurrency, engine=engine)  # engine: see io.Reader
        self.buf = AlignedBuf(max(L.region_bytes for L in store.layers))
        self.bytes_view = as_tensor(self.buf)  # (bytes,) uint8, zero-copy
        # on a GPU: where each region goes up to (None on the CPU: computed in place)
        self.dev_bytes = None if on_cpu(dev) else torch.empty(self.buf.capacity, dtype=torch.uint8, device=dev)
        self.b1 = [None if b is None else b.to(dev) for b in store.up_biases()]  # (n,) float32 fc1 bias (OPT)
        self.q = [store.q_bundles(i) for i in range(store.config.n_layers)]  # quantized: down scales (resident)
        self.io_s = self.compute_s = 0.0
        self.bytes_read = self.requests = 0

    def _read(self, layer: int) -> Tensor:
        L = self.store.layers[layer]
        if self.verify_reads:  # GIL released
            self.reader.read_region_checked(
                L.offset, L.region_bytes, self.buf, L.payload_bytes, L.crc32, f"layer {layer}'s region"
            )
        else:
            self.reader.read(
                [(L.offset + o, min(PIECE, L.region_bytes - o), self.buf, o) for o in range(0, L.region_bytes, PIECE)]
            )
        self.bytes_read += L.region_bytes
        self.requests += -(-L.region_bytes // PIECE)  # PIECE-sized reads either way
        if self.store.quant:  # (n, bundle_bytes) uint8 blocks
            return self.bytes_view[: L.payload_bytes].view(L.n_neurons, -1)
        payload = self.bytes_view[: L.payload_bytes]
        if self.dev_bytes is not None:
            payload = self.dev_bytes[: L.payload_bytes].copy_(payload)
        payload = payload.view(self.store.dtype)
        return payload.view(L.n_neurons, -1)  # (n, bundle_values)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        t0 = time.perf_counter()
        bundles = self._read(layer)
        t1 = time.perf_counter()
        if self.store.quant:
            y = q_rows_ffn(x, bundles, self.config, self.q[layer], self.b1[layer])
        else:
            y = rows_ffn(x, bundles, self.config, self.b1[layer])
        if self.dev_bytes is not None:  # the GPU's work counted where it ran, not at the next read
            synchronize(self.device)
        self.io_s += t1 - t0
        self.compute_s += time.perf_counter() - t1
        return y

    def stats(self) -> dict[str, float]:
        return {
            "ffn_io_s": self.io_s,
            "ffn_compute_s": self.compute_s,
            "mgmt_s": 0.0,
            "bytes_read": float(self.bytes_read),
            "requests": float(self.requests),
            "ffn_buffer_bytes": float(self.buf.capacity),
        }

    def reset_stats(self) -> None:
        self.io_s = self.compute_s = 0.0
        self.bytes_read = self.requests = 0


assert PIECE % ALIGN == 0
