"""OpenELM's layer-wise scaling: per-layer query heads, KV heads and FFN width.

Transcribed from Apple's corenet (`corenet/modeling/models/language_modeling/general_gpt.py`,
`GPTConfig.__post_init__` and `FeedForwardNetwork.__init__`; `make_divisible` from
`corenet/utils/math_utils.py`). Everything else about OpenELM (q/k RMSNorm before RoPE, fused
qkv_proj, SwiGLU with a fused proj_1, tied embeddings) is expressed with ModelConfig flags and
handled by the shared transformer; the converter splits the fused tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number
from typing import Sequence

import numpy as np


def make_divisible(v: float, divisor: int = 8, min_value: float | None = None) -> int:
    """Nearest multiple of `divisor` (at least `min_value`, default the divisor); one divisor more
    if rounding lost over 10% of v. Same arithmetic as corenet, so the same widths come out."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def _per_layer(mult: Number | Sequence[Number], n_layers: int, what: str) -> list[float]:
    """A scalar (uniform), a pair (linspace over the layers, rounded to 2 decimals, as corenet
    does) or one value per layer (what Hugging Face's OpenELMConfig saves for ffn_multipliers)."""
    if isinstance(mult, bool):
        raise ValueError(f"{what} must be a number or a list of numbers, got {mult!r}")
    if isinstance(mult, Number):
        return [float(mult)] * n_layers  # type: ignore[arg-type]
    if not isinstance(mult, (list, tuple)) or not all(isinstance(m, Number) and not isinstance(m, bool) for m in mult):
        raise ValueError(f"{what} must be a number or a list of numbers, got {mult!r:.80}")
    if len(mult) == 2:
        return [round(float(v), 2) for v in np.linspace(mult[0], mult[1], num=n_layers, dtype=float)]
    if len(mult) == n_layers:
        return [float(m) for m in mult]
    raise ValueError(
        f"{what} must have 2 entries (first and last layer) or {n_layers} (one per layer), got {len(mult)}"
    )


@dataclass
class OpenELMDims:
    n_heads: list[int]  # query heads per layer
    n_kv_heads: list[int]  # KV heads per layer
    ffn_dims: list[int]  # FFN neurons per layer


def openelm_dims(
    model_dim: int,
    head_dim: int,
    n_layers: int,
    num_gqa_groups: int,
    qkv_multipliers: Number | Sequence[Number],
    ffn_multipliers: Number | Sequence[Number],
    ffn_dim_divisor: int,
) -> OpenELMDims:
    """Per-layer widths exactly as corenet's GPTConfig computes them. Raises ValueError."""
    for name, v in (
        ("model_dim", model_dim),
        ("head_dim", head_dim),
        ("num_transformer_layers", n_layers),
        ("num_gqa_groups", num_gqa_groups),
        ("ffn_dim_divisor", ffn_dim_divisor),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r:.40}")
    query_dims = [
        make_divisible(model_dim * m, divisor=head_dim * num_gqa_groups)
        for m in _per_layer(qkv_multipliers, n_layers, "qkv_multipliers")
    ]
    n_heads = [q // head_dim for q in query_dims]  # exact: q is a multiple of head_dim
    n_kv = [h // num_gqa_groups for h in n_heads]
    ffn = [
        make_divisible(m * model_dim, divisor=ffn_dim_divisor)
        for m in _per_layer(ffn_multipliers, n_layers, "ffn_multipliers")
    ]
    return OpenELMDims(n_heads, n_kv, ffn)
