"""`dense`: every neuron of every layer in DRAM. The exactness reference for the other strategies,
and the way to run a model that fits in memory.

A quantized store's FFN becomes two quantized matrices per layer, in neuron order: the bundles'
gate and up rows (2n, D) as they are, and down_proj (D, n) rebuilt from the bundles' raw integers
and the resident group scales into the blocks the store was written from (models/quant.join_down:
bytes moved, never rounded). Every product is then a row-major quantized matvec
(models/quant.QTensor: native for a few tokens, dequantized blocks of rows for many), which reads
down's blocks along the neurons about twice as fast as the bundle kernel's column-wise down
accumulation (strategies/base.q_rows_ffn, kept for layers whose width is not whole groups of 32).
No float copy is held.

Memory: one copy of the FFN (the whole of ffn.bin, less its padding). Each layer's bundles are
read once (CRC-checked), copied out into contiguous matrices, and the bundle buffer dropped, so
the peak is one layer above that (on a GPU, `device`: each layer's matrices go there as they are
made, so host memory holds one layer). Contiguous copies rather than strided views of the bundles:
gate and up fuse into one (2n, D) product, and with down transposed to (D, n) both products have
the (out, in) layout whose half-precision matrix-vector kernel is fast (the (n, D) row layout
runs several times slower in float16; see models/layers.py).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from ..device import on_cpu
from ..errors import InvalidArgumentError
from ..models.layers import ACTIVATIONS, linear
from ..models.moe import route, routed_sum
from ..models.quant import BLOCK, QBundles, QTensor, down_bytes, join_down, row_bytes
from ..models.transformer import Transformer
from ..store import Store, split_bundles
from .base import q_rows_ffn


class DenseFFN:
    name = "dense"

    def __init__(self, store: Store, dequantize: bool = False, device: torch.device | None = None):
        """`dequantize`: a quantized store's FFN as float32 matrices w1/w2 like a float store's
        (calibration reads them; a whole float copy, for that offline step only). `device`: where
        the matrices live and the FFN runs (default the CPU; a float store's only on a GPU)."""
        c = store.config
        self.config = c
        dev = self.device = device or torch.device("cpu")
        if store.quant and not dequantize and not on_cpu(dev):
            raise InvalidArgumentError(
                f"a quantized store runs on the CPU only (device {dev} asked): use --device cpu", store.path
            )
        self.act = ACTIVATIONS[c.act]
        # (None for a quantized layer on the bundle kernel)
        self.w1: list[Tensor | QTensor | None] = []  # (2n, D) gate rows then up rows, or (n, D) up rows
        self.w2: list[Tensor | QTensor | None] = []  # (D, n)  down_proj / fc2 as in Hugging Face
        # (n,) fc1 bias (OPT), float32, store order
        self.b1: list[Tensor | None] = [None if b is None else b.to(dev) for b in store.up_biases()]
        self.quant = None if dequantize else store.quant
        self.routers = [r.to(dev) for r in store.routers()]  # mixture of experts: (E, D) per layer
        self.rows: list[Tensor] = []  # quantized stores: each layer's bundles as read, (n, bundle_bytes) uint8
        self.q: list[QBundles] = []  # and each layer's bundle format (its down scales)
        for i in range(c.n_layers):
            if self.quant:
                rows = store.read_layer(i, verify=True)
                store.check_groups(i, rows)  # a StoreError now, not the kernel's at a token
                q = store.q_bundles(i)
                if rows.shape[0] % BLOCK or c.n_experts:  # a partial last down group, or experts: bundle kernel
                    self.rows.append(rows)
                    self.q.append(q)
                    self.w1.append(None)
                    self.w2.append(None)
                else:
                    self._quantized_matrices(store, i, rows, q)
                continue
            layer = store.read_layer_float(i) if store.quant else store.read_layer(i, verify=True)
            parts = split_bundles(layer, c)
            rows = [parts["gate"], parts["up"]] if c.gated else [parts["up"]]
            self.w1.append(torch.cat(rows, dim=0).contiguous().to(dev))
            self.w2.append(parts["down"].t().contiguous().to(dev))

    def _quantized_matrices(self, store: Store, i: int, rows: Tensor, q: QBundles) -> None:
        """Layer i's bundles `rows` (n, bundle_bytes) as w1 and w2 QTensors in neuron order (the
        fc1 bias reordered with them)."""
        c, kind, n = self.config, q.kind, rows.shape[0]
        order = store.layers[i].order
        if order is not None:  # store position -> neuron: put bundle p at row order[p]
            inv = torch.from_numpy(np.argsort(np.asarray(order)))
            rows = rows[inv]
            if self.b1[i] is not None:
                self.b1[i] = self.b1[i][inv]
        rb, fields = row_bytes(kind, c.dim), q.fields - 1
        w1 = rows[:, : fields * rb].contiguous().view(n, fields, rb).transpose(0, 1).reshape(fields * n, rb)
        down = rows[:, fields * rb : fields * rb + down_bytes(kind, c.dim)].numpy()
        m = None if q.down_min is None else q.down_min.numpy()
        w2 = join_down(kind, down, q.down_scale.numpy(), m)
        self.w1.append(QTensor(kind, (fields * n, c.dim), w1.contiguous()))
        self.w2.append(QTensor(kind, (c.dim, n), torch.from_numpy(w2)))
        self.rows.append(rows[:0])
        self.q.append(q)

    def native_matrices(self) -> list[tuple[QTensor, QTensor]] | None:
        """Each layer's (w1, w2) QTensors for a whole-token native decode (models/native_decode:
        gate rows then up rows, SiLU, no bias), or None where a layer is not that."""
        c = self.config
        if not (self.quant and c.gated and c.act == "silu") or any(b is not None for b in self.b1):
            return None
        if not all(isinstance(w, QTensor) for w in (*self.w1, *self.w2)):
            return None
        return list(zip(self.w1, self.w2))  # type: ignore[arg-type]

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D) float32."""
        if self.routers:
            experts, weights = route(x, self.routers[layer], self.config)
            return routed_sum(x, experts, weights, lambda e, xs: self._expert(layer, e, xs))
        if self.quant and self.rows[layer].shape[0]:
            return q_rows_ffn(x, self.rows[layer], self.config, self.q[layer], self.b1[layer])
        h = linear(x, self.w1[layer])  # (T, 2n) or (T, n)
        if self.config.gated:
            g, u = h.chunk(2, dim=-1)  # (T, n) each
            h = self.act(g) * u
        else:
            b = self.b1[layer]
            h = self.act(h + b if b is not None else h)
        return linear(h, self.w2[layer])  # (T, D)

    def _expert(self, layer: int, e: int, x: Tensor) -> Tensor:
        """Expert e of a mixture-of-experts layer on x (t, D): its slices of w1 (gate rows, then
        up rows) and w2."""
        n, f = self.config.ffn_dims[layer], self.config.expert_dim(layer)
        if self.quant:  # the expert's bundles, each carrying its down group (store/layout.py)
            return q_rows_ffn(x, self.rows[layer][e * f : (e + 1) * f], self.config, self.q[layer])
        w1, w2 = self.w1[layer], self.w2[layer]
        g, u = linear(x, w1[e * f : (e + 1) * f]), linear(x, w1[n + e * f : n + (e + 1) * f])
        return linear(self.act(g) * u, w2[:, e * f : (e + 1) * f])

    def stats(self) -> dict[str, float]:
        tensors = [t for t in (*self.w1, *self.w2, *self.rows, *self.b1, *self.routers) if t is not None]
        scales = sum(q.nbytes for q, r in zip(self.q, self.rows) if r.shape[0])  # bundle kernel layers
        size = lambda t: t.nbytes if isinstance(t, QTensor) else t.numel() * t.element_size()  # noqa: E731
        return {"ffn_resident_bytes": float(scales + sum(size(t) for t in tensors))}


def load_dense(path: str | os.PathLike[str]) -> tuple[Transformer, Store]:
    """(Transformer with the dense FFN, Store) for the store folder at `path`."""
    store = Store(path)
    return Transformer.from_store(store, DenseFFN(store)), store
