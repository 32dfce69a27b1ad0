"""Decision thresholds from quantile tables of held-out scores.

Calibration keeps, per layer, QUANTILES quantiles of the held-out logits (or shadow scores) of
active and of inactive (token, neuron) pairs. From them any target recall gives a threshold
without recalibrating, and a threshold gives the expected recall, precision and predicted share.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

QUANTILES = 1001  # stored quantile levels of held-out logits: 0.1% resolution


def sample_quantiles(v: Tensor, gen: torch.Generator, limit: int = 1 << 22) -> Tensor:
    """(QUANTILES,) float32 quantiles of v (a random sample of `limit` values when larger)."""
    if v.numel() == 0:
        return torch.zeros(QUANTILES)
    if v.numel() > limit:
        v = v[torch.randint(v.numel(), (limit,), generator=gen)]
    return torch.quantile(v.double(), _levels()).float()


def _levels() -> Tensor:
    return torch.linspace(0, 1, QUANTILES, dtype=torch.float64)


def _interp(xs: Tensor, ys: Tensor, x: float) -> float:
    """Piecewise-linear y(x) for increasing xs."""
    i = int(torch.searchsorted(xs, torch.tensor(x, dtype=xs.dtype)).clamp(1, len(xs) - 1))
    x0, x1, y0, y1 = float(xs[i - 1]), float(xs[i]), float(ys[i - 1]), float(ys[i])
    return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def threshold_for_recall(pos_quantiles: Tensor, recall: float) -> float:
    """The logit threshold that keeps `recall` of the active pairs: their (1 - recall) quantile
    (just below it, so recall 1.0 keeps the smallest one seen too)."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    t = _interp(_levels(), pos_quantiles.double(), 1.0 - recall)
    return math.nextafter(t, -math.inf) if recall >= 1.0 else t


def share_above(quantiles: Tensor, threshold: float) -> float:
    """Estimated share of values > threshold from a quantile table."""
    q = quantiles.double()
    if threshold < float(q[0]):
        return 1.0
    if threshold >= float(q[-1]):
        return 0.0
    return 1.0 - _interp(q, _levels(), threshold)


def expected(pos_quantiles: Tensor, neg_quantiles: Tensor, pos_rate: float, threshold: float) -> dict[str, float]:
    """Held-out estimates at `threshold`: recall, precision and predicted share of the pairs
    (`pos_rate`: the share of held-out pairs that are active)."""
    tpr, fpr = share_above(pos_quantiles, threshold), share_above(neg_quantiles, threshold)
    predicted = pos_rate * tpr + (1 - pos_rate) * fpr
    return {"recall": tpr, "precision": pos_rate * tpr / predicted if predicted > 0 else 1.0, "predicted": predicted}
