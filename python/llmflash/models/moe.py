"""Mixture of experts: the router and the routed sum every strategy computes (models/config.py
gives the layout: expert e of a layer is its neurons [e*F, (e+1)*F)).

    y_t = sum over the token's top-k experts e of  w_te * expert_e(x_t)

with w_t the softmax of the router's logits over all E experts, its k largest kept (divided by
their sum when norm_topk_prob), as transformers' Mixtral computes it."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .config import ModelConfig
from .layers import linear


def route(x: Tensor, router: Tensor, config: ModelConfig) -> tuple[Tensor, Tensor]:
    """x (T, D) -> (experts (T, k) int64, weights (T, k) float32) for the router (E, D)."""
    probs = torch.softmax(linear(x.to(router.dtype), router).float(), dim=-1)
    w, e = torch.topk(probs, config.experts_per_token, dim=-1)
    if config.norm_topk_prob:
        w = w / w.sum(dim=-1, keepdim=True)
    return e, w


def routed_sum(x: Tensor, experts: Tensor, weights: Tensor, expert_ffn: Callable[[int, Tensor], Tensor]) -> Tensor:
    """sum_t,slot weights[t, slot] * expert_ffn(experts[t, slot], x[t]) as (T, D) float32: each
    expert used once, over the tokens routed to it, in ascending expert order."""
    y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for e in expert_ids(experts):
        t, slot = torch.where(experts == e)
        y.index_add_(0, t, expert_ffn(e, x[t]).float() * weights[t, slot, None])
    return y


def expert_ids(experts: Tensor) -> list[int]:
    """The distinct experts of a routing (T, k), ascending."""
    return torch.unique(experts).tolist()
