"""What "active" means for a neuron, and the bit-packed labels calibration keeps.

- ReLU FFNs (OPT): neuron i is active for a token when act_i > 0 (natural sparsity).
- SwiGLU / GELU FFNs (Llama, OpenELM): magnitude sparsity (CATS/TEAL): active when
  |silu(gate_i) * up_i| exceeds a per-layer threshold, the (1 - keep) quantile of that
  magnitude over the calibration tokens, so `keep` is the share of (token, neuron) pairs that
  are active on average (keep = 1 - sparsity). A per-layer threshold rather than a per-token
  top-k: tokens with more activation mass get more neurons, and the label is a property of
  one (token, neuron) pair, which is what a per-neuron logit can learn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.config import ModelConfig
from ..models.layers import ACTIVATIONS


def label_kind(config: ModelConfig) -> str:
    """ "relu" (act > 0) for plain ReLU FFNs, else "magnitude" (|act| over a threshold)."""
    return "relu" if not config.gated and config.act == "relu" else "magnitude"


def activations(config: ModelConfig, w1: Tensor, x: Tensor, b1: Tensor | None = None) -> Tensor:
    """Every neuron's activation, (T, n) float32, from DenseFFN-style weights: w1 (2n, D) gate
    rows then up rows (gated) or (n, D) up rows; b1 (n,) fc1 bias. Columns in w1's row order."""
    h = F.linear(x.float(), w1.float())  # (T, 2n) or (T, n)
    act = ACTIVATIONS[config.act]
    if config.gated:
        g, u = h.chunk(2, dim=-1)
        return act(g) * u
    return act(h + b1.float() if b1 is not None else h)


def labels(kind: str, act: Tensor, threshold: float) -> Tensor:
    """(T, n) bool: which neurons are active (see the module docstring)."""
    return act > 0 if kind == "relu" else act.abs() > threshold


# Calibration keeps N x n labels per layer, at 1 bit each.
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(y: Tensor) -> Tensor:
    """(T, n) bool -> (T, ceil(n/8)) uint8."""
    T, n = y.shape
    pad = (-n) % 8
    if pad:
        y = F.pad(y, (0, pad))
    return (y.view(T, -1, 8).to(torch.uint8) * _BITS).sum(-1, dtype=torch.uint8)


def unpack_bits(p: Tensor, n: int) -> Tensor:
    """(T, ceil(n/8)) uint8 -> (T, n) bool."""
    return ((p.unsqueeze(-1) & _BITS) != 0).view(p.shape[0], -1)[:, :n]
