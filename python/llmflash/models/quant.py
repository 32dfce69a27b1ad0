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
    """The native kernels (llmflash._native's q_matvec, q_bundle_ffn, q_dequantize), imported lazily."""
    from .._native import q_bundle_ffn, q_dequantize, q_matvec

    return _Kernels(q_matvec, q_bundle_ffn, q_dequantize)


@dataclass(frozen=True)
class _Kernels:
    q_matvec: Any
    q_bundle_ffn: Any
    q_dequantize: Any


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
