"""Neuron ids: a store may keep a layer's neurons permuted (bundle p of ffn.bin holds original
neuron `order[p]`, LayerRegion.order); labels, predictors, rates and wanted sets speak original
ids. These two helpers are the one way to go from store positions to original ids."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def order_inverse(order: Sequence[int] | None) -> Tensor | None:
    """The store position of each original neuron id (LongTensor), the inverse of a layer's
    `order`; None when the layer keeps the original order."""
    if order is None:
        return None
    o = torch.as_tensor(order, dtype=torch.long)
    inverse = torch.empty_like(o)
    inverse[o] = torch.arange(len(o))
    return inverse


def in_original_ids(t: Tensor, inverse: Tensor | None, dim: int = -1) -> Tensor:
    """`t` with its neuron axis `dim` (store positions) reordered to original neuron ids:
    activations (T, n) with dim=-1, weight rows (n, D) with dim=0. `inverse`: order_inverse."""
    return t if inverse is None else t.index_select(dim, inverse)
