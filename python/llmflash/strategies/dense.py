"""`dense`: every neuron of every layer in DRAM. The exactness reference for the other strategies,
and the way to run a model that fits in memory.

Memory: one copy of the FFN (the whole of ffn.bin, less its padding). Each layer's bundles are
read once (CRC-checked), split into contiguous gate|up and down matrices, and the bundle buffer
dropped, so the peak is one layer above that. Contiguous copies rather than strided views of the
bundles: the two gated projections fuse into one (2n, D) matrix product, and BLAS runs fastest on
dense rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..models.layers import ACTIVATIONS
from ..store import Store, split_bundles


class DenseFFN:
    name = "dense"

    def __init__(self, store: Store):
        c = store.config
        self.config = c
        self.act = ACTIVATIONS[c.act]
        self.w1: list[Tensor] = []            # (2n, D) gate rows then up rows, or (n, D) up rows
        self.w2: list[Tensor] = []            # (n, D)  down rows (columns of down_proj / fc2)
        self.b1: list[Tensor | None] = []     # (n,)    fc1 bias (OPT)
        for i in range(c.n_layers):
            parts = split_bundles(store.read_layer(i, verify=True), c)
            rows = [parts["gate"], parts["up"]] if c.gated else [parts["up"]]
            self.w1.append(torch.cat(rows, dim=0).contiguous())
            self.w2.append(parts["down"].contiguous())
            self.b1.append(parts["bias"].contiguous() if "bias" in parts else None)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D), in the store dtype."""
        x = x.to(self.w1[layer].dtype)
        h = torch.matmul(x, self.w1[layer].t())                           # (T, 2n) or (T, n)
        if self.config.gated:
            g, u = h.chunk(2, dim=-1)                                     # (T, n) each
            h = self.act(g) * u
        else:
            b = self.b1[layer]
            h = self.act(h + b if b is not None else h)
        return torch.matmul(h, self.w2[layer])                            # (T, D)

    def stats(self) -> dict[str, float]:
        tensors = [*self.w1, *self.w2, *(b for b in self.b1 if b is not None)]
        return {"ffn_resident_bytes": float(sum(t.numel() * t.element_size() for t in tensors))}
