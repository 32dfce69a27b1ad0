"""Quantized weights: GGML's block formats q8_0, q4_0 and q4_1 (32 values per block; a float16
scale d, and for q4_1 a float16 minimum m), as quantized stores hold them (store/layout.py).

    q8_0  34 B per block: d, then 32 int8 q                    value = d * q
    q4_0  18 B per block: d, then 16 bytes of 4-bit q          value = d * (q - 8)
    q4_1  20 B per block: d, m, then 16 bytes of 4-bit q       value = d * q + m
          (byte j holds value j in its low nibble and value j + 16 in its high one)

A QTensor is a 2-D weight (rows, cols) quantized along its rows (cols a multiple of 32): its
bytes (rows, cols / 32 * block_bytes) uint8. It never becomes a whole float matrix: decode
multiplies it natively (llmflash._native.q_matvec), prefill dequantizes blocks of rows at a
time (`dequantize(rows=...)`, llmflash._native.q_dequantize) for torch's GEMM.

A QBundles is what a quantized FFN layer's bundles need besides their bytes: the kind, the
width, and the layer's down scales (store/layout.py: down_proj is quantized along its rows in
blocks of 32 neurons, as a GGUF holds it; a bundle carries its down column's raw integers and
its group, the layer keeps each group's scales resident).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..threads import native_threads

BLOCK = 32  # values per block, every kind
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}
KINDS = tuple(BLOCK_BYTES)
DEQUANT_BYTES = 16 << 20  # float32 bytes one prefill step dequantizes at once


def row_bytes(kind: str, cols: int) -> int:
    """Bytes of one quantized row of `cols` values (cols a multiple of BLOCK)."""
    return cols // BLOCK * BLOCK_BYTES[kind]


@functools.cache
def _native() -> "_Kernels":
    """The native kernels (llmflash._native's q_matvec, q_bundle_ffn, q_bundle_dequantize,
    q_dequantize), imported lazily."""
    from .._native import q_bundle_dequantize, q_bundle_ffn, q_dequantize, q_matvec

    return _Kernels(q_matvec, q_bundle_ffn, q_bundle_dequantize, q_dequantize)


@dataclass(frozen=True)
class _Kernels:
    q_matvec: Any
    q_bundle_ffn: Any
    q_bundle_dequantize: Any
    q_dequantize: Any


def down_bytes(kind: str, dim: int) -> int:
    """Bytes of a bundle's down field: `dim` raw integers (int8 for q8_0, nibbles for q4)."""
    return dim if kind == "q8_0" else dim // 2


def bundle_bytes(kind: str, dim: int, gated: bool) -> int:
    """Bytes of one quantized bundle: [gate,] up as blocks, the down integers, the u32 group."""
    return (2 if gated else 1) * row_bytes(kind, dim) + down_bytes(kind, dim) + 4


def groups(n_neurons: int) -> int:
    """Down-scale groups of a layer: one per 32 neurons (the last padded)."""
    return -(-n_neurons // BLOCK)


@dataclass(eq=False)
class QBundles:
    """A quantized FFN layer's bundle format: `kind`, width `dim`, `gated`, and its down scales
    `down_scale` (and `down_min`, q4_1 only): (groups, dim) float16, row r of group g the scale of
    down_proj's block (r, g). Bundle rows are (n, >= bundle_bytes) uint8 views."""

    kind: str
    dim: int
    gated: bool
    down_scale: Tensor  # (groups, dim) float16
    down_min: Tensor | None  # (groups, dim) float16, q4_1

    def __post_init__(self) -> None:
        bits = lambda t: t.contiguous().view(torch.int16).numpy().view(np.uint16)  # noqa: E731
        self._d = bits(self.down_scale)
        self._m = None if self.down_min is None else bits(self.down_min)

    @property
    def fields(self) -> int:
        return 3 if self.gated else 2

    @property
    def nbytes(self) -> int:
        """DRAM of the down scales."""
        return self._d.nbytes + (0 if self._m is None else self._m.nbytes)

    def ffn(self, x: Tensor, rows: Tensor, bias: Tensor | None, pick: Any, threads: int) -> Tensor:
        """One token's FFN over bundle rows natively (llmflash._native.q_bundle_ffn): (D,) float32."""
        return torch.from_numpy(
            _native().q_bundle_ffn(
                self.kind,
                rows.numpy(),
                x.float().contiguous().numpy(),
                self.gated,
                self._d,
                self._m,
                None if bias is None else bias.float().contiguous().numpy(),
                threads,
                None if pick is None else np.ascontiguousarray(pick, dtype=np.uint32),
            )
        )

    def dequantize(self, rows: Tensor) -> Tensor:
        """Bundle rows (n, >= bundle_bytes) uint8 as float32 (n, fields, dim): [gate,] up, down."""
        n = rows.shape[0]
        if n == 0:
            return torch.zeros(0, self.fields, self.dim)
        out = _native().q_bundle_dequantize(self.kind, rows.numpy(), self.dim, self.gated, self._d, self._m)
        return torch.from_numpy(out).view(n, self.fields, self.dim)


def dequantize_blocks(kind: str, data: np.ndarray, n_values: int) -> np.ndarray:
    """(n_values,) float32 from the 1-D uint8 blocks `data` (n_values / 32 blocks)."""
    return _native().q_dequantize(kind, np.ascontiguousarray(data).reshape(-1), n_values)


@dataclass(eq=False)
class QTensor:
    """A quantized (rows, cols) matrix: `data` (rows, row_bytes) uint8, row r's blocks in order."""

    kind: str
    shape: tuple[int, int]  # logical (rows, cols)
    data: Tensor  # (rows, row_bytes) uint8

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.kind not in BLOCK_BYTES or cols % BLOCK or tuple(self.data.shape) != (rows, row_bytes(self.kind, cols)):
            raise ValueError(f"bad {self.kind} tensor: shape {self.shape}, bytes {tuple(self.data.shape)}")
        if self.data.dtype != torch.uint8:
            raise ValueError("QTensor data must be uint8")

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def dtype(self) -> torch.dtype:  # the dtype it computes in
        return torch.float32

    def dim(self) -> int:
        return 2

    def dequantize(self, rows: slice | Tensor | None = None) -> Tensor:
        """Rows of the matrix (all, a slice, or an index tensor) as float32 (k, cols)."""
        d = self.data if rows is None else self.data[rows]
        d = d.contiguous()
        k = d.shape[0]
        if k == 0:
            return torch.zeros(0, self.shape[1])
        out = dequantize_blocks(self.kind, d.numpy(), k * self.shape[1])
        return torch.from_numpy(out).view(k, self.shape[1])

    def scales(self) -> Tensor:
        """Every block's float16 scale (and q4_1's minimum), (rows, blocks, 1 or 2): the only
        values of a block that can be NaN or Inf."""
        bb = BLOCK_BYTES[self.kind]
        blocks = self.data.contiguous().view(self.shape[0], -1, bb)
        return blocks[..., : 4 if self.kind == "q4_1" else 2].contiguous().view(torch.float16)

    def row_chunks(self) -> int:
        """Rows per prefill step: their float32 copy stays under DEQUANT_BYTES."""
        return max(1, DEQUANT_BYTES // (4 * self.shape[1]))

    def matvec(self, x: Tensor) -> Tensor:
        """self @ x for x (cols,): (rows,) float32, natively (the configured threads)."""
        xs = x.float().contiguous().numpy()
        return torch.from_numpy(_native().q_matvec(self.kind, self.data.numpy(), xs, native_threads()))

    def linear(self, x: Tensor, b: Tensor | None = None) -> Tensor:
        """x (T, cols) @ self.T + b -> (T, rows) float32: row by row natively for few tokens,
        else blocks of dequantized rows through torch's GEMM."""
        x = x.float()
        if x.shape[0] < 16:  # models/layers.UPCAST_ROWS
            y = torch.stack([self.matvec(x[t]) for t in range(x.shape[0])])
        else:
            step = self.row_chunks()
            rows = self.shape[0]
            y = torch.empty(x.shape[0], rows)
            for a in range(0, rows, step):
                y[:, a : a + step] = x @ self.dequantize(slice(a, a + step)).t()
        return y if b is None else y + b.float()

    def embedding(self, ids: Tensor) -> Tensor:
        """Rows `ids` (T,) as float32 (T, cols): only those rows are dequantized."""
        return self.dequantize(ids.long())


def split_down(
    kind: str, blocks: np.ndarray, dim: int, n_groups: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """down_proj (dim, 32 n_groups) as GGML blocks along its rows (`blocks`: (dim, n_groups *
    block_bytes) uint8) -> the bundles' down fields (32 n_groups, down_bytes) uint8 (neuron j's
    raw integers along the model dimension, store/layout.py) and the scales `d` (n_groups, dim)
    float16, with the minimums `m` for q4_1 (else None). Bytes are moved, never rounded."""
    bb = BLOCK_BYTES[kind]
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(dim, n_groups, bb)
    d = np.ascontiguousarray(b[:, :, 0:2]).view(np.float16).reshape(dim, n_groups).T.copy()
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.float16).reshape(dim, n_groups).T.copy() if kind == "q4_1" else None
    qs = b[:, :, (4 if kind == "q4_1" else 2) :]
    if kind == "q8_0":  # (dim, groups, 32) -> (neurons, dim)
        return np.ascontiguousarray(qs.transpose(1, 2, 0).reshape(n_groups * BLOCK, dim)), d, m
    vals = np.concatenate([qs & 15, qs >> 4], axis=2)  # (dim, groups, 32): value k of each block
    v = vals.transpose(1, 2, 0).reshape(n_groups * BLOCK, dim // BLOCK, BLOCK)  # (neurons, chunks, 32 rows)
    packed = v[:, :, :16] | (v[:, :, 16:] << 4)
    return np.ascontiguousarray(packed.reshape(n_groups * BLOCK, dim // 2)), d, m


def join_down(kind: str, fields: np.ndarray, d: np.ndarray, m: np.ndarray | None) -> np.ndarray:
    """split_down's inverse: the bundles' down fields (32 n_groups, down_bytes) uint8 in neuron
    order and the scales `d` (and `m`, q4_1) (n_groups, dim) float16 -> down_proj (dim,
    32 n_groups) as GGML blocks along its rows, (dim, n_groups * block_bytes) uint8: the blocks
    the store was written from, byte for byte."""
    n_groups, dim = d.shape
    bb = BLOCK_BYTES[kind]
    f = np.ascontiguousarray(fields, dtype=np.uint8)
    if kind == "q8_0":  # (neurons, dim) -> (dim, groups, 32)
        qs = f.reshape(n_groups, BLOCK, dim).transpose(2, 0, 1)
    else:  # neuron j's nibbles: chunk c of 32 rows holds row c*32 + k in byte k's low (k < 16) or high nibble
        packed = f.reshape(n_groups * BLOCK, dim // BLOCK, 16)
        vals = np.concatenate([packed & 15, packed >> 4], axis=2).reshape(n_groups, BLOCK, dim)
        v = vals.transpose(2, 0, 1)  # (dim, groups, 32): value k of block (row, group)
        qs = v[:, :, :16] | (v[:, :, 16:] << 4)
    out = np.empty((dim, n_groups, bb), dtype=np.uint8)
    out[:, :, 0:2] = np.ascontiguousarray(d.T, dtype=np.float16).view(np.uint8).reshape(dim, n_groups, 2)
    if kind == "q4_1":
        out[:, :, 2:4] = np.ascontiguousarray(m.T, dtype=np.float16).view(np.uint8).reshape(dim, n_groups, 2)
    out[:, :, (4 if kind == "q4_1" else 2) :] = qs
    return out.reshape(dim, n_groups * bb)
