"""The one interface every FFN strategy implements (dense, naive, flash), so the transformer and
`bench` treat them alike.

An FFN strategy maps a layer's FFN input x (T, D) to

    y = sum over neurons i of  act_i(x) * down_i          (T, D)
    act_i(x) = act(x . gate_i) * (x . up_i)               gated (SwiGLU: Llama, OpenELM)
             = act(x . up_i + bias_i)                     plain (OPT: fc1 with its bias)

where gate_i, up_i, down_i (D,) are neuron i's bundle fields and bias_i its fc1 bias, which is
resident (Store.up_biases, in store order like the bundles): a strategy gathers the entries of
the rows it computes on. OPT's fc2 bias is not a neuron's: the transformer adds it from the
resident weights. A strategy that admits only some neurons returns the same sum over those;
with every neuron admitted it must equal `dense`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ..models.layers import ACTIVATIONS, linear
from ..threads import native_threads


@runtime_checkable
class FFN(Protocol):
    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) in the store dtype -> (T, D), in the store dtype or float32."""
        ...


def bundle_ffn(x: Tensor, up: Tensor, down: Tensor, gate: Tensor | None = None,
               bias: Tensor | None = None, act: str = "silu") -> Tensor:
    """The FFN over a set of neurons given as rows: x (T, D); up, gate, down (n, D); bias (n,)
    the rows' fc1 biases (float32, resident, gathered for these rows). Returns (T, D) float32.

    The rows may be strided views into a bundle matrix (store.split_bundles): `linear` reads
    gate/up in place with the bundle length as row stride (and upcasts for many rows). For
    several tokens, half-precision down rows are upcast for the product (the slow layout for a
    half-precision GEMM, models/layers.py); for one token a GEMV reads them in place.
    """
    f = ACTIVATIONS[act]
    h = linear(x, up)                                                     # (T, n)
    if gate is not None:
        if bias is not None:
            raise ValueError("a gated FFN with an fc1 bias is not a supported layout")
        h = f(linear(x, gate)) * h                                        # (T, n)
    else:
        if bias is not None:
            h = h + bias.float()
        h = f(h)
    if h.shape[0] == 1 and down.dtype != torch.float32:
        return rows_gemv(down, h[0]).unsqueeze(0)                         # (1, D)
    return torch.matmul(h, down.float())                                  # (T, D)


def rows_gemv(down: Tensor, h: Tensor) -> Tensor:
    """sum_i h[i] * down[i] for half-precision rows down (n, D) (any row stride, unit column
    stride) and h (n,): (D,) float32, for decode. float16 rows go to the native kernel
    (llmflash._native.f16_rows_gemv: F16C + FMA, two threads, skips h = 0): 0.8 ms for OPT-6.7B's
    3,651 cached rows with ReLU activations, 1.8 ms with none zero, against 11.3 ms for torch's
    float16 mv in this layout (and 48 ms upcasting the rows first). bfloat16 rows use torch's mv,
    fast for that type (3.4 ms)."""
    if down.dtype == torch.float16 and down.shape[0] > 0 and (down.shape[1] == 1 or down.stride(1) == 1):
        from .._native import f16_rows_gemv

        rows = down.view(torch.int16).numpy()
        return torch.from_numpy(f16_rows_gemv(rows, h.float().contiguous().numpy(), native_threads()))
    return torch.mv(down.t(), h.to(down.dtype)).float()


def rows_ffn(x: Tensor, rows: Tensor, config, bias: Tensor | None = None, pick=None) -> Tensor:
    """The FFN over bundle rows (n, bundle_values) (store.split_bundles layout) for x (T, D),
    with the rows' fc1 biases (n,) or None: (T, D) float32. `pick` (k,) uint32 numpy: only
    those rows (bias still indexed by row), read in place by the native kernel.

    One decode token over float16 rows of a ReLU or SiLU-gated FFN runs natively in one pass per
    bundle (llmflash._native.f16_bundle_ffn: up (and gate) dot x, then the down row only where the
    activation is not 0): 3.3 against 7.2 ms for OPT-6.7B's 3,651 cached rows measured inside a
    token through split views and torch products. Everything else goes through bundle_ffn."""
    gated = bool(config.gated)
    if (x.shape[0] == 1 and rows.dtype == torch.float16 and rows.shape[0] > 0 and rows.stride(1) == 1
            and (config.act == "silu" if gated else config.act == "relu") and not (gated and bias is not None)):
        from .._native import f16_bundle_ffn

        y = f16_bundle_ffn(rows.view(torch.int16).numpy(), x[0].float().contiguous().numpy(), gated,
                           None if bias is None else bias.float().contiguous().numpy(), native_threads(),
                           None if pick is None else np.ascontiguousarray(pick, dtype=np.uint32))
        return torch.from_numpy(y).unsqueeze(0)
    from ..store import split_bundles

    if pick is not None:
        idx = torch.from_numpy(np.asarray(pick, dtype=np.int64))
        rows, bias = rows[idx], None if bias is None else bias[idx]

    p = split_bundles(rows, config)
    return bundle_ffn(x.to(rows.dtype), p["up"], p["down"], p.get("gate"), bias, config.act)
