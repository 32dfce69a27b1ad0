"""The building blocks of the decoder, as plain functions on tensors (no nn.Module).

Precision: weights stay in the store dtype; norms, RoPE and the attention softmax run in float32
(casting a (T, D) activation is cheap next to the (D, D) matrix products), so float16/bfloat16
stores lose only what their weights lose.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..device import on_cpu
from ..threads import in_decode, native_threads
from .config import check_rope_scaling
from .quant import QTensor


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """(..., C) -> (..., C) float32: x / rms(x) * weight (Llama, OpenELM; weight float32)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """(..., C) -> (..., C) float32 (OPT; weight and bias float32)."""
    return F.layer_norm(x.float(), weight.shape, weight, bias, eps)


# Matrix products. On CPU a half-precision matrix-vector product is as fast as float32's or
# faster (memory-bound, half the bytes), but a half-precision matrix-matrix product runs several
# times slower than float32's (torch has no fast fp16/bf16 GEMM kernel for most CPUs). So decode
# (few rows) multiplies in the store dtype, and prefill (many rows) upcasts the weight for the
# call; both accumulate to a float32 result.
UPCAST_ROWS = 16


def linear(x: Tensor, w: Tensor | QTensor, b: Tensor | None = None) -> Tensor:
    """x (T, in) @ w (out, in).T + b -> (T, out) float32, w in the store dtype (or a QTensor of a
    quantized store: few rows natively row by row, many through blocks of dequantized rows).

    Inside threads.decode_threads() (one token of a large float16 model), one float16 row goes to
    the native kernel (llmflash._native.f16_matvec: F16C + FMA, float32 accumulation and result,
    the configured threads): faster than torch's float16 linear for large models' shapes, which
    also rounds its result to float16."""
    if isinstance(w, QTensor):
        return w.linear(x, b)
    if not on_cpu(w):  # a GPU: its half-precision products are fast at any shape
        return F.linear(x.to(w.dtype), w, None if b is None else b.to(w.dtype)).float()
    if w.dtype != torch.float32 and x.shape[0] >= UPCAST_ROWS:
        return F.linear(x.float(), w.float(), None if b is None else b.float())
    if (
        x.shape[0] == 1
        and in_decode()
        and w.dtype == torch.float16
        and w.dim() == 2
        and w.shape[0] > 0
        and w.stride(1) == 1
    ):
        from .._native import f16_matvec

        xs = x[0].to(torch.float16).float().contiguous().numpy()  # the input rounded as F.linear's
        y = torch.from_numpy(f16_matvec(w.view(torch.int16).numpy(), xs, native_threads())).unsqueeze(0)
        return y if b is None else y + b.float()
    return F.linear(x.to(w.dtype), w, b).float()


def embedding(ids: Tensor, w: Tensor | QTensor) -> Tensor:
    """Rows `ids` (T,) of the table w (V, E) as float32 (T, E); a QTensor dequantizes only those."""
    if isinstance(w, QTensor):
        return w.embedding(ids)
    return F.embedding(ids, w).float()


def table_rows(w: Tensor | QTensor, a: int, b: int) -> Tensor:
    """Rows a..b-1 of the table w as float32 (learned positions)."""
    if isinstance(w, QTensor):
        return w.dequantize(slice(a, b))
    return w[a:b].float()


ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,  # exact (erf) GELU: Hugging Face's "gelu"
}


# -- rotary position embedding ----------------------------------------------------------------------
def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    """(head_dim/2,) float32 inverse frequencies, computed the way transformers does (float32
    powers of theta), with the "linear" and "llama3" (Llama 3.1) rescalings. A malformed `scaling`
    (missing key, non-number, unknown type) is a ValueError naming the key (config.check_rope_scaling)."""
    check_rope_scaling(scaling)
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(scaling["factor"])  # type: ignore[index]
    if kind == "llama3":
        s = scaling  # type: ignore[assignment]
        factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
        old_len = float(s["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        # long wavelengths (low frequencies) are slowed down by `factor`, short ones kept, the band
        # between them interpolated smoothly.
        inv_l = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, inv_l)
    raise ValueError(f"unsupported rope scaling {kind!r}")


def rope_tables(inv_freq: Tensor, n_positions: int) -> tuple[Tensor, Tensor]:
    """cos, sin (n_positions, head_dim) float32 for positions 0..n_positions-1 (half-split layout)."""
    pos = torch.arange(n_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (P, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd)
    return emb.cos(), emb.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (H, T, hd) float32, cos/sin (T, hd): rotate pairs (i, i + hd/2) by each position's angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


# -- attention --------------------------------------------------------------------------------------
SCORE_BLOCK_BYTES = 8 << 20  # attention scores held at once: queries go in blocks under this


def causal_attention(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """Grouped-query causal attention for one sequence, float32.

    q (Hq, T, hd): queries at positions start..start+T-1; k, v (Hkv, S, hd) with S = start + T:
    every key so far. Query head h reads KV head h // (Hq // Hkv) (transformers' repeat_kv and
    corenet's repeat_interleave). Returns (T, Hq * hd).

    The (Hq, T, S) score matrix of a long prompt would grow with the square of its length: the
    queries go in blocks whose scores stay under SCORE_BLOCK_BYTES, each block reading only the
    keys up to its last position (each query's softmax is its own, so blocks change nothing).
    """
    Hq, T, hd = q.shape
    S = k.shape[1]
    rows = max(1, SCORE_BLOCK_BYTES // (4 * Hq * S))
    if T <= rows:
        return _causal_block(q, k, v, start)
    return torch.cat(
        [
            _causal_block(q[:, a : a + rows], k[:, : start + a + rows], v[:, : start + a + rows], start + a)
            for a in range(0, T, rows)
        ]
    )


def _causal_block(q: Tensor, k: Tensor, v: Tensor, start: int) -> Tensor:
    """causal_attention for one block of queries: k, v (Hkv, S, hd) with S >= start + T."""
    Hq, T, hd = q.shape
    Hkv, S, _ = k.shape
    g = Hq // Hkv
    # Grouping the query heads by their KV head lets one batched matmul serve the whole group
    # without materialising repeated keys: (Hkv, g*T, hd) @ (Hkv, hd, S).
    qg = q.reshape(Hkv, g * T, hd)
    scores = torch.matmul(qg, k.transpose(1, 2)) * (hd**-0.5)  # (Hkv, g*T, S)
    if T > 1:
        t = torch.arange(T, device=q.device).unsqueeze(1) + start  # (T, 1) query positions
        future = torch.arange(S, device=q.device).unsqueeze(0) > t  # (T, S)
        scores = scores.view(Hkv, g, T, S).masked_fill(future, float("-inf")).view(Hkv, g * T, S)
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v)  # (Hkv, g*T, hd)
    return out.view(Hq, T, hd).transpose(0, 1).reshape(T, Hq * hd)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int) -> Tensor:
    """causal_attention for one query (the last of `length` positions), over the KV cache as it
    is stored: q (Hq, 1, hd) float32; k_cache, v_cache (Hkv, capacity, hd) contiguous, float16
    or float32, positions 0..length-1 filled. Returns (1, Hq * hd) float32.

    The native kernel (llmflash._native.attend_one) reads float16 keys and values as they are,
    where the torch path upcast the whole cache to float32 every token; inside decode_threads()
    it splits the KV heads between the configured threads. Other dtypes (bfloat16), non-contiguous
    caches and a cache on a GPU go through causal_attention."""
    Hq, T, hd = q.shape
    if (
        T != 1
        or not on_cpu(k_cache)
        or k_cache.dtype not in (torch.float16, torch.float32)
        or v_cache.dtype != k_cache.dtype
        or not (k_cache.is_contiguous() and v_cache.is_contiguous())
    ):
        return causal_attention(q, k_cache[:, :length].float(), v_cache[:, :length].float(), length - 1)
    from .._native import attend_one

    bits = (lambda t: t.view(torch.int16).numpy()) if k_cache.dtype == torch.float16 else (lambda t: t.numpy())
    out = attend_one(
        q.reshape(Hq, hd).float().contiguous().numpy(),
        bits(k_cache),
        bits(v_cache),
        length,
        hd**-0.5,
        native_threads() if in_decode() else 1,
    )
    return torch.from_numpy(out).unsqueeze(0)
