"""`dense`: every neuron of every layer in DRAM. The exactness reference for the other strategies,
and the way to run a model that fits in memory.

A quantized store's bundles stay as read, (n, bundle_bytes) uint8 per layer: decode and short
prompts run natively on them (strategies/base.q_rows_ffn), a long prompt dequantizes chunks of
bundles.

Memory: one copy of the FFN (the whole of ffn.bin, less its padding). Each layer's bundles are
read once (CRC-checked), copied out into contiguous matrices, and the bundle buffer dropped, so
the peak is one layer above that. Contiguous copies rather than strided views of the bundles:
gate and up fuse into one (2n, D) product, and with down transposed to (D, n) both products have
the (out, in) layout whose half-precision matrix-vector kernel is fast (the (n, D) row layout
runs several times slower in float16; see models/layers.py).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..models.layers import ACTIVATIONS, linear
from ..models.quant import QBundles
from ..models.transformer import Transformer
from ..store import Store, split_bundles
from .base import q_rows_ffn


class DenseFFN:
    name = "dense"

    def __init__(self, store: Store, dequantize: bool = False):
        """`dequantize`: a quantized store's FFN as float32 matrices w1/w2 like a float store's
        (calibration reads them; a whole float copy, for that offline step only)."""
        c = store.config
        self.config = c
        self.act = ACTIVATIONS[c.act]
        self.w1: list[Tensor] = []  # (2n, D) gate rows then up rows, or (n, D) up rows
        self.w2: list[Tensor] = []  # (D, n)  down_proj / fc2 as in Hugging Face
        self.b1: list[Tensor | None] = store.up_biases()  # (n,) fc1 bias (OPT), float32, store order
        self.quant = None if dequantize else store.quant
        self.rows: list[Tensor] = []  # quantized stores: each layer's bundles as read, (n, bundle_bytes) uint8
        self.q: list[QBundles] = []  # and each layer's bundle format (its down scales)
        for i in range(c.n_layers):
            if self.quant:
                self.rows.append(store.read_layer(i, verify=True))
                store.check_groups(i, self.rows[-1])  # a StoreError now, not the kernel's at a token
                self.q.append(store.q_bundles(i))
                continue
            layer = store.read_layer_float(i) if store.quant else store.read_layer(i, verify=True)
            parts = split_bundles(layer, c)
            rows = [parts["gate"], parts["up"]] if c.gated else [parts["up"]]
            self.w1.append(torch.cat(rows, dim=0).contiguous())
            self.w2.append(parts["down"].t().contiguous())

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D) float32."""
        if self.quant:
            return q_rows_ffn(x, self.rows[layer], self.config, self.q[layer], self.b1[layer])
        h = linear(x, self.w1[layer])  # (T, 2n) or (T, n)
        if self.config.gated:
            g, u = h.chunk(2, dim=-1)  # (T, n) each
            h = self.act(g) * u
        else:
            b = self.b1[layer]
            h = self.act(h + b if b is not None else h)
        return linear(h, self.w2[layer])  # (T, D)

    def stats(self) -> dict[str, float]:
        tensors = [*self.w1, *self.w2, *self.rows, *(b for b in self.b1 if b is not None)]
        scales = sum(q.nbytes for q in self.q)
        return {"ffn_resident_bytes": float(scales + sum(t.numel() * t.element_size() for t in tensors))}


def load_dense(path: str | os.PathLike[str]) -> tuple[Transformer, Store]:
    """(Transformer with the dense FFN, Store) for the store folder at `path`."""
    store = Store(path)
    return Transformer.from_store(store, DenseFFN(store)), store
