"""Neuron ids: a store may keep a layer's neurons permuted (bundle p of ffn.bin holds original
neuron `order[p]`, LayerRegion.order); labels, predictors, rates and wanted sets speak original
ids. These helpers are the one way between store positions and original ids."""

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


def in_store_positions(t: Tensor, order: Tensor | None, dim: int = -1) -> Tensor:
    """The reverse of in_original_ids: `t` with its neuron axis `dim` (original ids) reordered to
    store positions. `order`: the layer's order as a LongTensor (None: the original order)."""
    return t if order is None else t.index_select(dim, order)
