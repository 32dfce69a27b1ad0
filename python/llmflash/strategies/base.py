"""What the FFN strategies (dense, naive, flash) share: the FFN over a set of neuron rows.

Every strategy implements the model's FFN interface (llmflash.models.ffn.FFN, which states the
sum a strategy computes), so the transformer and `bench` treat them alike. A neuron's rows
(gate, up, down) are its bundle's fields; its fc1 bias (OPT) is resident (Store.up_biases, in
store order like the bundles): a strategy gathers the entries of the rows it computes on.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..device import on_cpu
from ..models.layers import ACTIVATIONS, UPCAST_ROWS, linear
from ..models.quant import QBundles
from ..store import split_bundles
from ..threads import native_threads


def bundle_ffn(
    x: Tensor, up: Tensor, down: Tensor, gate: Tensor | None = None, bias: Tensor | None = None, act: str = "silu"
) -> Tensor:
    """The FFN over a set of neurons given as rows: x (T, D); up, gate, down (n, D); bias (n,)
    the rows' fc1 biases (float32, resident, gathered for these rows). Returns (T, D) float32.

    The rows may be strided views into a bundle matrix (store.split_bundles): `linear` reads
    gate/up in place with the bundle length as row stride (and upcasts for many rows). For
    several tokens, half-precision down rows are upcast for the product (the slow layout for a
    half-precision GEMM, models/layers.py); for one token a GEMV reads them in place.
    """
    f = ACTIVATIONS[act]
    h = linear(x, up)  # (T, n)
    if gate is not None:
        if bias is not None:
            raise ValueError("a gated FFN with an fc1 bias is not a supported layout")
        h = f(linear(x, gate)) * h  # (T, n)
    else:
        if bias is not None:
            h = h + bias.float()
        h = f(h)
    if not on_cpu(down):  # a GPU multiplies half precision at any shape
        return torch.matmul(h.to(down.dtype), down).float()
    if h.shape[0] == 1 and down.dtype != torch.float32:
        return rows_gemv(down, h[0]).unsqueeze(0)  # (1, D)
    return torch.matmul(h, down.float())  # (T, D)


def rows_gemv(down: Tensor, h: Tensor) -> Tensor:
    """sum_i h[i] * down[i] for half-precision rows down (n, D) (any row stride, unit column
    stride) and h (n,): (D,) float32, for decode. float16 rows go to the native kernel
    (llmflash._native.f16_rows_gemv: F16C + FMA, the configured threads, skips h = 0), several
    times faster than torch's float16 mv in this strided layout; bfloat16 rows use torch's mv,
    fast for that type."""
    if down.dtype == torch.float16 and down.shape[0] > 0 and (down.shape[1] == 1 or down.stride(1) == 1):
        from .._native import f16_rows_gemv

        rows = down.view(torch.int16).numpy()
        return torch.from_numpy(f16_rows_gemv(rows, h.float().contiguous().numpy(), native_threads()))
    return torch.mv(down.t(), h.to(down.dtype)).float()


def q_rows_ffn(x: Tensor, rows: Tensor, config, q: QBundles, bias: Tensor | None = None, pick=None) -> Tensor:
    """rows_ffn for a quantized store's bundles: rows (n, >= bundle_bytes) uint8 in the layer's
    bundle format `q` (store/layout.py). Fewer than UPCAST_ROWS tokens of a SiLU-gated or ReLU FFN
    run natively token by token (QBundles.ffn: dequantizing on the fly, `pick` read in place);
    otherwise chunks of bundles are dequantized to float32 (at most DEQUANT_BYTES at once) and
    summed."""
    from ..models.quant import DEQUANT_BYTES

    gated = bool(config.gated)
    D = config.dim
    if x.shape[0] < UPCAST_ROWS and rows.shape[0] > 0 and (config.act == "silu" if gated else config.act == "relu"):
        # a few tokens (decode, a short prompt): natively, token by token, no float copy
        return torch.stack([q.ffn(x[t], rows, bias, pick, native_threads()) for t in range(x.shape[0])])
    if pick is not None:
        idx = torch.from_numpy(np.asarray(pick, dtype=np.int64))
        rows, bias = rows[idx], None if bias is None else bias[idx]
    x = x.float()
    y = torch.zeros(x.shape[0], D)
    step = max(1, DEQUANT_BYTES // (4 * q.fields * D))
    for a in range(0, rows.shape[0], step):
        w = q.dequantize(rows[a : a + step])
        b = None if bias is None else bias[a : a + step]
        y += bundle_ffn(x, w[:, -2], w[:, -1], w[:, 0] if gated else None, b, config.act)
    return y


def rows_ffn(
    x: Tensor, rows: Tensor, config, bias: Tensor | None = None, pick=None, q: QBundles | None = None
) -> Tensor:
    """The FFN over bundle rows (n, bundle_values) (store.split_bundles layout) for x (T, D),
    with the rows' fc1 biases (n,) or None: (T, D) float32. `pick` (k,) uint32 numpy: only
    those rows (bias still indexed by row), read in place by the native kernel.

    One decode token over float16 rows of a ReLU or SiLU-gated FFN runs natively in one pass per
    bundle (llmflash._native.f16_bundle_ffn: up (and gate) dot x, then the down row only where the
    activation is not 0), about twice as fast as split views and torch products. Everything else
    goes through bundle_ffn. uint8 rows are a quantized store's bundles in the layer's format `q`
    (q_rows_ffn)."""
    if rows.dtype == torch.uint8:
        if q is None:
            raise ValueError("quantized bundle rows need their layer's bundle format (QBundles)")
        return q_rows_ffn(x, rows, config, q, bias, pick)
    gated = bool(config.gated)
    if (
        x.shape[0] == 1
        and on_cpu(rows)
        and rows.dtype == torch.float16
        and rows.shape[0] > 0
        and rows.stride(1) == 1
        and (config.act == "silu" if gated else config.act == "relu")
        and not (gated and bias is not None)
    ):
        from .._native import f16_bundle_ffn

        y = f16_bundle_ffn(
            rows.view(torch.int16).numpy(),
            x[0].float().contiguous().numpy(),
            gated,
            None if bias is None else bias.float().contiguous().numpy(),
            native_threads(),
            None if pick is None else np.ascontiguousarray(pick, dtype=np.uint32),
        )
        return torch.from_numpy(y).unsqueeze(0)
    if pick is not None:
        idx = torch.from_numpy(np.asarray(pick, dtype=np.int64)).to(rows.device)
        rows, bias = rows[idx], None if bias is None else bias[idx]

    p = split_bundles(rows, config)
    return bundle_ffn(x.to(rows.dtype), p["up"], p["down"], p.get("gate"), bias, config.act)
