"""One decode token of a quantized pre-norm RMSNorm model (Llama family, OpenELM) with each layer's
attention half in one native call (llmflash._native.QAttention: norm, q/k/v products, q/k norms,
RoPE, the KV cache write, attention, the output product and residual, and the FFN's norm).

Why: a small quantized model's token is dominated by per-op overhead, not arithmetic. The Python
layer (transformer.py's `_attention`) dispatches about twenty torch ops a layer, a few
microseconds each around products of a few microseconds; one native call does the same work in
the same float32 order (the two agree to float32 rounding), on the quantized weights in place.
The FFN stays the strategy's (dense, naive or flash), called with the returned input; where the
strategy holds every layer's FFN as whole quantized matrices (dense, `native_matrices`), the whole
token runs in one native call (llmflash._native.QDecoder: each layer's attention half, then its
gate/up product, SiLU and down product), so a token costs one Python call instead of about four a
layer.

Covered: every layer's q, k, v and o quantized in one kind, RMSNorm before attention and FFN,
a float32 KV cache (a quantized store's), rotary embeddings or none. Anything else (OPT's
LayerNorm and post-norm, float stores) runs the Python layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..threads import native_threads
from .quant import QTensor

# The model (models/transformer.Transformer) and its KV cache are typed Any here: transformer.py
# imports this module, and the package keeps its imports acyclic.


def native_layers(model: Any) -> list[Any] | None:
    """Each layer's llmflash._native.QAttention, or None where the model is not covered."""
    c = model.config
    if not (model.quantized and c.norm == "rms" and c.pre_norm and model.dtype == torch.float32):
        return None
    if c.qk_norm_all:  # the kernel norms each head; OLMoE's q/k norm spans the whole projection
        return None
    kinds = {w.kind if isinstance(w, QTensor) else None for L in model.layers for w in (L.q, L.k, L.v, L.o)}
    if len(kinds) != 1 or None in kinds:
        return None
    from .._native import QAttention

    f32 = lambda t: None if t is None else t.float().contiguous().numpy()  # noqa: E731
    out = []
    for L in model.layers:
        out.append(
            QAttention(
                L.q.kind,
                *(w.data.numpy() for w in (L.q, L.k, L.v, L.o)),
                f32(L.attn_norm.weight),
                f32(L.ffn_norm.weight),
                L.n_heads,
                L.n_kv_heads,
                c.head_dim,
                c.norm_eps,
                bias=[f32(b) for b in (L.q_b, L.k_b, L.v_b, L.o_b)],
                qk_norm=[f32(L.q_norm), f32(L.k_norm)],
            )
        )
    return out


def native_decoder(model: Any) -> Any | None:
    """A llmflash._native.QDecoder over the model's layers and its FFN's quantized matrices, or
    None (no native attention, or an FFN that is not whole quantized SiLU matrices in one kind)."""
    if model.native_layers is None or any(L.down_bias is not None for L in model.layers):
        return None
    mats = getattr(model.ffn, "native_matrices", lambda: None)()
    if mats is None or len({w.kind for pair in mats for w in pair}) != 1:
        return None
    from .._native import QDecoder

    w1, w2 = [a.data.numpy() for a, _ in mats], [b.data.numpy() for _, b in mats]
    return QDecoder(mats[0][0].kind, model.native_layers, w1, w2)


def decode_layers(model: Any, x: Tensor, cache: Any, pos: int, cos: Tensor | None, sin: Tensor | None) -> Tensor:
    """x (1, D) float32 through every layer at position `pos` (the cache already has room):
    (1, D) float32, the cache's keys and values written."""
    layers = model.native_layers
    early = getattr(model.ffn, "early", None)
    xs = x[0].float().contiguous().clone()
    xn = xs.numpy()  # the residual stream, updated in place by each step
    rope = (
        {} if cos is None or sin is None else {"cos": cos[0].contiguous().numpy(), "sin": sin[0].contiguous().numpy()}
    )
    threads = native_threads()
    decoder = model.native_decoder
    if decoder is not None and early is None:
        decoder.run(xn, pos, [k.numpy() for k in cache.k], [v.numpy() for v in cache.v], threads=threads, **rope)
        return xs[None]
    for i, L in enumerate(model.layers):
        if early is not None:  # flash lookahead="attention": this layer's set guessed from its FFN norm now
            early(i, model._norm(xs[None], L.ffn_norm))
        h = layers[i].step(xn, pos, cache.k[i].numpy(), cache.v[i].numpy(), threads=threads, **rope)
        xs += model._ffn(i, L, torch.from_numpy(h)[None])[0]  # the FFN, OPT's fc2 bias, a shared expert
    return xs[None]


def cache_fits(cache: Any) -> bool:
    """Whether the cache is what the native step writes into: float32, C-contiguous."""
    return all(t.dtype == torch.float32 and t.is_contiguous() for t in (*cache.k, *cache.v))
