"""Low-rank predictors, the paper's form: per layer, a map from the FFN input to one logit per
neuron through rank R (two linear maps d -> R -> n, here with biases), trained by calibration
(llmflash.sparsity.calibration) on the labels of llmflash.sparsity.labels.

    x (T, D) -> h = x A^T + a (T, R) -> z = h B^T + b (T, n) -> wanted = {i : z[t, i] > tau} over t

Rank R costs R(D+n) multiply-adds per token and layer against 3Dn for a SwiGLU FFN (rank 128 on
SmolLM2 is 10% of the dense FFN). SwiGLU magnitude sparsity is hard to predict at low rank:
|silu(g) u| depends on |u|, which no linear logit can express, so such models need a high target
recall (0.99 names about 95% of SmolLM2's neurons to stay within 1% of dense perplexity) and save
little I/O; ReLU models (the paper's OPT, act > 0) are the case they fit. The shadow predictors
(llmflash.sparsity.shadow) are the other kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.layers import UPCAST_ROWS, linear
from .labels import unpack_bits
from .quantiles import sample_quantiles
from .shadow import ShadowLayer


@dataclass
class LayerPredictor:
    in_w: Tensor  # (R, D)
    in_b: Tensor  # (R,)   float32
    out_w: Tensor  # (n, R)
    out_b: Tensor  # (n,)   float32

    def __post_init__(self) -> None:
        # No nonlinearity between the maps, so the first bias folds into the second:
        # (x A^T + a) B^T + b = (x A^T) B^T + (a B^T + b). Decode then costs two GEMVs and a
        # compare, about half the time of the unfused maps.
        self.bias = F.linear(self.in_b.float()[None], self.out_w.float())[0] + self.out_b.float()  # (n,)

    def scores(self, x: Tensor) -> Tensor:
        """x (T, D) -> (T, n): the logits less their bias, in the weights' dtype for decode
        (few tokens: half-precision GEMVs), float32 for many tokens (see models/layers.py)."""
        if x.shape[0] >= UPCAST_ROWS or self.in_w.dtype == torch.float32:
            return linear(linear(x, self.in_w), self.out_w)
        return F.linear(F.linear(x.to(self.in_w.dtype), self.in_w), self.out_w)

    def logits(self, x: Tensor) -> Tensor:
        """x (T, D) -> (T, n) float32."""
        return self.scores(x).float() + self.bias

    @property
    def rank(self) -> int:
        return self.in_w.shape[0]

    def macs(self) -> int:
        return self.in_w.numel() + self.out_w.numel()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.in_w, self.in_b, self.out_w, self.out_b))


@dataclass
class TrainResult:
    predictor: "LayerPredictor | ShadowLayer"  # ShadowLayer for kind "shadow"
    pos_quantiles: Tensor  # (Q,) held-out logits of active pairs
    neg_quantiles: Tensor  # (Q,)
    pos_rate: float  # share of held-out pairs that are active
    loss: float  # last epoch's mean training loss
    rate: Tensor | None = None  # (n,) per neuron: share of calibration tokens on which it is active


def train_layer(
    x: Tensor,
    packed: Tensor,
    n: int,
    rank: int,
    heldout: int,
    epochs: int = 2,
    batch: int = 512,
    lr: float = 3e-3,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    progress: Any = None,
) -> TrainResult:
    """Fit one layer's predictor on x[:-heldout] (N, D) and bit-packed labels (N, ceil(n/8)),
    with balanced binary cross-entropy (positives weighted by #inactive / #active) and Adam
    (one-cycle learning rate). Then measure the held-out logits, computed with the weights
    rounded to `dtype` as they will be stored.

    Training sees standardized inputs (per-channel mean and scale from the training split: a few
    channels of the FFN input are orders of magnitude larger than the rest); the standardization
    is folded into the first map afterwards, so the stored predictor takes raw x.
    """
    gen = torch.Generator().manual_seed(seed)
    N, D = x.shape
    ntr = N - heldout
    if ntr < 1 or heldout < 1:
        raise ValueError(f"need training and held-out tokens, got {ntr} and {heldout}")
    rank = max(1, min(rank, D, n))
    xtr = x[:ntr].float()
    mu = xtr.mean(0)
    sd = xtr.std(0, unbiased=False).clamp_min(1e-6)
    pos = 0
    for s in range(0, ntr, 4096):
        pos += int(unpack_bits(packed[s : min(s + 4096, ntr)], n).sum())
    total = ntr * n
    pos_weight = torch.tensor((total - pos) / max(pos, 1)).clamp(0.01, 100.0)
    params = _initial(rank, D, n, pos / max(total, 1), gen)
    xs = (xtr - mu) / sd  # standardized
    del xtr
    loss = _fit(params, xs, packed, n, pos_weight, epochs, min(batch, ntr), lr, gen, progress)
    with torch.no_grad():
        # fold the standardization: A ((x - mu) / sd) + a = (A / sd) x + (a - (A / sd) mu)
        in_w, in_b, out_w, out_b = (p.detach() for p in params)
        a_w = in_w / sd
        pred = LayerPredictor(a_w.to(dtype), (in_b - a_w @ mu).float(), out_w.to(dtype), out_b.float())
        z = torch.cat(
            [
                F.linear(
                    F.linear(x[s : s + 4096].float(), pred.in_w.float(), pred.in_b), pred.out_w.float(), pred.out_b
                )
                for s in range(ntr, N, 4096)
            ]
        )
        y = torch.cat([unpack_bits(packed[s : min(s + 4096, N)], n) for s in range(ntr, N, 4096)])
        return TrainResult(
            pred, sample_quantiles(z[y], gen), sample_quantiles(z[~y], gen), float(y.float().mean()), loss
        )


def _initial(rank: int, D: int, n: int, rate: float, gen: torch.Generator) -> list[Tensor]:
    """[in_w, in_b, out_w, out_b] before training: torch's Linear initialization for the maps,
    and output biases at the logit of the active share `rate`."""
    in_w = torch.empty(rank, D)
    out_w = torch.empty(n, rank)
    torch.nn.init.kaiming_uniform_(in_w, a=math.sqrt(5), generator=gen)
    torch.nn.init.kaiming_uniform_(out_w, a=math.sqrt(5), generator=gen)
    rate = min(max(rate, 1e-4), 1 - 1e-4)
    out_b = torch.full((n,), math.log(rate / (1 - rate)))
    return [p.requires_grad_() for p in (in_w, torch.zeros(rank), out_w, out_b)]


def _fit(
    params: list[Tensor],
    xs: Tensor,
    packed: Tensor,
    n: int,
    pos_weight: Tensor,
    epochs: int,
    batch: int,
    lr: float,
    gen: torch.Generator,
    progress: Any,
) -> float:
    """Train `params` in place on the standardized inputs `xs` (ntr, D); the last epoch's mean loss."""
    in_w, in_b, out_w, out_b = params
    ntr = xs.shape[0]
    opt = torch.optim.Adam(params, lr=lr)
    steps_per_epoch = ntr // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * steps_per_epoch))
    loss_sum, loss_n = 0.0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(ntr, generator=gen)
            loss_sum, loss_n = 0.0, 0
            for s in range(steps_per_epoch):
                idx = perm[s * batch : (s + 1) * batch]
                yb = unpack_bits(packed[idx], n).float()  # (B, n)
                z = F.linear(F.linear(xs[idx], in_w, in_b), out_w, out_b)  # (B, n)
                loss = F.binary_cross_entropy_with_logits(z, yb, pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum, loss_n = loss_sum + loss.detach().item(), loss_n + 1
                if progress is not None:
                    progress.update(1)
    return loss_sum / max(loss_n, 1)
