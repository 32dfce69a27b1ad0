"""Sparsity predictors: per layer, a low-rank map from the FFN input to one logit per neuron,
the paper's form (two linear maps d -> R -> n, here with biases), trained by `llmflash calibrate`.
A second kind, "shadow" (llmflash.shadow: the FFN's gate/up rows at 4 bits), shares the labels,
thresholds, quantile tables and file below; its layers replace the in/out tensors.

    x (T, D) -> h = x A^T + a (T, R) -> z = h B^T + b (T, n) -> wanted = {i : z[t, i] > tau} over t

Labels (what "active" means, chosen at calibration, recorded in the file):
  - ReLU FFNs (OPT): neuron i is active for a token when act_i > 0 (natural sparsity).
  - SwiGLU / GELU FFNs (Llama, OpenELM): magnitude sparsity (CATS/TEAL): active when
    |silu(gate_i) * up_i| exceeds a per-layer threshold, the (1 - keep) quantile of that
    magnitude over the calibration tokens, so `keep` is the share of (token, neuron) pairs that
    are active on average (keep = 1 - sparsity). A per-layer threshold rather than a per-token
    top-k: tokens with more activation mass get more neurons, and the label is a property of
    one (token, neuron) pair, which is what a per-neuron logit can learn.

The decision threshold tau is per layer, chosen on held-out calibration tokens for a target
recall (the share of active (token, neuron) pairs predicted). The file keeps quantiles of the
held-out logits of active and of inactive pairs, so `load_predictors(store, recall=r)` picks
the threshold for any other recall without recalibrating, and can say what share of neurons it
will predict.

The file format and its reading/writing: llmflash.predictor_file (load_predictors, save_predictors).

Cost (SmolLM2: D=576, n=1536, float16): rank R costs R(D+n) multiply-adds per token and layer
against 3Dn for the FFN: R=128 is 10% of the dense FFN (0.27 M vs 2.65 M), R=64 5%; in time
(decode, 2 threads) about 0.1 ms per layer against 0.33 ms for the dense FFN layer, and
16.4 MB of weights for the 30 layers at R=128 (8.2 MB at R=64).

Measured on SmolLM2-135M (magnitude labels, keep 0.5; 16,384 calibration tokens; `llmflash
eval`, 512 held-out tokens, window 4). SwiGLU magnitude sparsity is hard to predict at low
rank: |silu(g) u| depends on |u|, which no linear logit can express, and the FFN input spreads
its variance over many directions (the top 128 of 576 hold 77-88%). Share of the |act| mass
kept when 50% of neurons are predicted (layer 20): rank 32 0.66, 64 0.71, 128 0.75, 256 0.79,
full-rank linear 0.80, oracle top-50% 0.90. Magnitude-weighted BCE, regression on log|act|, a
SwiGLU-shaped head (|silu(g^) u^| from a data-aware SVD), a ReLU between the maps and 10 epochs
all moved that by 0.02 or less; per-neuron activation rates are flat (40-60%), so there are no
hot neurons to pin. Hence a high recall: at 0.99 the predictors name 95% of neurons and flash
stays within 1% of dense perplexity (0.95: 86%, +4%; 0.90: 77%, +13%), and what they save in
I/O on this model is small; ReLU models (the paper's OPT, act > 0) are the case they fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .models.config import ModelConfig
from .models.layers import UPCAST_ROWS, linear
from .shadow import ShadowLayer

FORMAT = "llmflash-predictors"
VERSION = 1
QUANTILES = 1001                     # stored quantile levels of held-out logits: 0.1% resolution
MAX_PREDICTORS_BYTES = 1 << 34


# -- labels ------------------------------------------------------------------------------------------
def label_kind(config: ModelConfig) -> str:
    """"relu" (act > 0) for plain ReLU FFNs, else "magnitude" (|act| over a threshold)."""
    return "relu" if not config.gated and config.act == "relu" else "magnitude"


def activations(config: ModelConfig, w1: Tensor, x: Tensor, b1: Tensor | None = None) -> Tensor:
    """Every neuron's activation, (T, n) float32, from DenseFFN-style weights: w1 (2n, D) gate
    rows then up rows (gated) or (n, D) up rows; b1 (n,) fc1 bias. Columns in w1's row order."""
    from .models.layers import ACTIVATIONS

    h = F.linear(x.float(), w1.float())                                  # (T, 2n) or (T, n)
    act = ACTIVATIONS[config.act]
    if config.gated:
        g, u = h.chunk(2, dim=-1)
        return act(g) * u
    return act(h + b1.float() if b1 is not None else h)


def labels(kind: str, act: Tensor, threshold: float) -> Tensor:
    """(T, n) bool: which neurons are active (see the module docstring)."""
    return act > 0 if kind == "relu" else act.abs() > threshold


# -- bit-packed label storage (calibration keeps N x n labels per layer at 1 bit each) ----------------
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


# -- one layer's predictor ---------------------------------------------------------------------------
@dataclass
class LayerPredictor:
    in_w: Tensor       # (R, D)
    in_b: Tensor       # (R,)   float32
    out_w: Tensor      # (n, R)
    out_b: Tensor      # (n,)   float32

    def __post_init__(self) -> None:
        # No nonlinearity between the maps, so the first bias folds into the second:
        # (x A^T + a) B^T + b = (x A^T) B^T + (a B^T + b). Decode then costs two GEMVs and a
        # compare (measured here, SmolLM2 layer, 1 token: 90 us against 160 us unfused; the
        # dense FFN layer takes about 330 us).
        self.bias = F.linear(self.in_b.float()[None], self.out_w.float())[0] + self.out_b.float()   # (n,)

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
    predictor: "LayerPredictor | ShadowLayer"   # llmflash.shadow for kind "shadow"
    pos_quantiles: Tensor       # (Q,) held-out logits of active pairs
    neg_quantiles: Tensor       # (Q,)
    pos_rate: float             # share of held-out pairs that are active
    loss: float                 # last epoch's mean training loss
    rate: Tensor | None = None  # (n,) per neuron: share of calibration tokens on which it is active


def _sample_quantiles(v: Tensor, gen: torch.Generator, limit: int = 1 << 22) -> Tensor:
    if v.numel() == 0:
        return torch.zeros(QUANTILES)
    if v.numel() > limit:
        v = v[torch.randint(v.numel(), (limit,), generator=gen)]
    q = torch.linspace(0, 1, QUANTILES, dtype=torch.float64)
    return torch.quantile(v.double(), q).float()


def train_layer(x: Tensor, packed: Tensor, n: int, rank: int, heldout: int, epochs: int = 2,
                batch: int = 512, lr: float = 3e-3, seed: int = 0, dtype: torch.dtype = torch.float16,
                progress: Any = None) -> TrainResult:
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
        pos += int(unpack_bits(packed[s:min(s + 4096, ntr)], n).sum())
    total = ntr * n
    pos_weight = torch.tensor((total - pos) / max(pos, 1)).clamp(0.01, 100.0)

    in_w = torch.empty(rank, D)
    out_w = torch.empty(n, rank)
    torch.nn.init.kaiming_uniform_(in_w, a=math.sqrt(5), generator=gen)
    torch.nn.init.kaiming_uniform_(out_w, a=math.sqrt(5), generator=gen)
    in_b = torch.zeros(rank)
    rate = min(max(pos / max(total, 1), 1e-4), 1 - 1e-4)
    out_b = torch.full((n,), math.log(rate / (1 - rate)))
    params = [p.requires_grad_() for p in (in_w, in_b, out_w, out_b)]
    opt = torch.optim.Adam(params, lr=lr)
    batch = min(batch, ntr)
    steps_per_epoch = ntr // batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(1, epochs * steps_per_epoch))
    loss_sum, loss_n = 0.0, 0
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(ntr, generator=gen)
            loss_sum, loss_n = 0.0, 0
            for s in range(steps_per_epoch):
                idx = perm[s * batch:(s + 1) * batch]
                xb = (xtr[idx] - mu) / sd                                  # (B, D)
                yb = unpack_bits(packed[idx], n).float()                   # (B, n)
                z = F.linear(F.linear(xb, in_w, in_b), out_w, out_b)       # (B, n)
                loss = F.binary_cross_entropy_with_logits(z, yb, pos_weight=pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum, loss_n = loss_sum + loss.detach().item(), loss_n + 1
                if progress is not None:
                    progress.update(1)
    with torch.no_grad():
        # fold the standardization: A ((x - mu) / sd) + a = (A / sd) x + (a - (A / sd) mu)
        a_w = in_w.detach() / sd
        a_b = in_b.detach() - a_w @ mu
        pred = LayerPredictor(a_w.to(dtype), a_b.float(), out_w.detach().to(dtype), out_b.detach().float())
        z = torch.cat([F.linear(F.linear(x[s:s + 4096].float(), pred.in_w.float(), pred.in_b),
                                pred.out_w.float(), pred.out_b) for s in range(ntr, N, 4096)])
        y = torch.cat([unpack_bits(packed[s:min(s + 4096, N)], n) for s in range(ntr, N, 4096)])
        result = TrainResult(pred, _sample_quantiles(z[y], gen), _sample_quantiles(z[~y], gen),
                             float(y.float().mean()), loss_sum / max(loss_n, 1))
    return result


# -- thresholds from stored quantiles ----------------------------------------------------------------
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


# -- the wanted-set source ---------------------------------------------------------------------------
class Predictors:
    """The calibrated predictors of a store, as a wanted-set source (llmflash.sparsity):

        ids = predictors(layer, x)      # x (T, D) -> sorted unique original neuron ids (union over T)
    """

    def __init__(self, layers: list[LayerPredictor], thresholds: list[float], pos_quantiles: Tensor,
                 neg_quantiles: Tensor, pos_rate: Tensor, label_thresholds: Tensor, meta: dict[str, Any],
                 path: Path | None = None, stay: float | None = None, rates: list[Tensor] | None = None,
                 hot: list[Tensor] | None = None, cold: list[Tensor] | None = None):
        self.layers = layers
        # Hot pinning (read_predictors(hot=share)): per layer, the `hot` neurons (original ids,
        # the most often active on the calibration text) stay resident and are computed every
        # token; `layers[i]` then predicts only the `cold` ones (original ids of its rows).
        self.rates, self.hot, self.cold = rates, hot, cold
        self.thresholds = thresholds
        self.cuts = [t - L.bias for t, L in zip(thresholds, layers)]      # (n,) float32 per layer
        # Hysteresis (`stay`, a second, higher target recall): a neuron the cache holds stays
        # wanted while its logit clears the lower threshold of that recall (see `select`).
        self.stay = stay
        self.stay_cuts = None if stay is None else [
            threshold_for_recall(q, stay) - L.bias for q, L in zip(pos_quantiles, layers)]
        self.pos_quantiles = pos_quantiles
        self.neg_quantiles = neg_quantiles
        self.pos_rate = pos_rate
        self.label_thresholds = label_thresholds
        self.meta = meta
        self.path = path

    @property
    def recall(self) -> float:
        return float(self.meta["recall"])

    @property
    def sticky(self) -> bool:
        """Whether `select` depends on what the cache holds (a `stay` recall was given)."""
        return self.stay is not None

    def with_recall(self, recall: float, stay: float | None = None) -> "Predictors":
        """The same predictors, thresholds re-chosen for another target recall; with `stay`
        (a recall >= `recall`), cached neurons are kept by that recall's lower threshold."""
        for name, r in (("recall", recall), ("stay", stay)):
            if r is not None and not 0.0 < r <= 1.0:
                raise ValueError(f"predictor {name} must be in (0, 1], not {r}")
        if stay is not None and stay < recall:
            raise ValueError(f"predictor stay recall {stay} is below the recall {recall}: a cached neuron "
                             "would need a higher score to stay than a new one to enter")
        th = [threshold_for_recall(q, recall) for q in self.pos_quantiles]
        return Predictors(self.layers, th, self.pos_quantiles, self.neg_quantiles, self.pos_rate,
                          self.label_thresholds, {**self.meta, "recall": recall}, self.path, stay=stay,
                          rates=self.rates, hot=self.hot, cold=self.cold)

    def logits(self, layer: int, x: Tensor) -> Tensor:
        return self.layers[layer].logits(x)

    def predict(self, layer: int, x: Tensor) -> Tensor:
        """(T, n) bool: the per-token predictions (logit > threshold, as scores > threshold - bias);
        with hot pinning, hot neurons are always predicted (they are always computed)."""
        m = self.layers[layer].scores(x) > self.cuts[layer]
        if self.cold is None:
            return m
        assert self.hot is not None                    # cold and hot are set together
        out = torch.ones(m.shape[0], len(self.cold[layer]) + len(self.hot[layer]), dtype=torch.bool)
        out[:, self.cold[layer]] = m
        return out

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """Sorted original ids of the neurons to read: the predicted ones (cold ones only, with
        hot pinning: the hot ones are resident)."""
        return self._to_ids(layer, _ids(self.layers[layer].scores(x) > self.cuts[layer]))

    def _to_ids(self, layer: int, local: Tensor) -> Tensor:
        return local if self.cold is None else self.cold[layer][local]

    def select(self, layer: int, x: Tensor, cached: Tensor) -> Tensor:
        """The wanted set given what the layer's cache holds, `cached` ((n,) bool, original
        ids): neurons over the threshold, and cached ones over the lower `stay` threshold.
        Hysteresis: a cached neuron whose score wanders just under the threshold stays (it is
        computed at no I/O cost) instead of leaving with the window and being read again a few
        tokens later; a neuron the cache does not hold must clear the higher bar to cost a read.
        Without `stay`, the plain prediction."""
        if self.stay_cuts is None:
            return self(layer, x)
        s = self.layers[layer].scores(x)                                 # (T, n) (cold: (T, n_cold))
        held = cached if self.cold is None else cached[self.cold[layer]]
        return self._to_ids(layer, _ids((s > self.cuts[layer]) | ((s > self.stay_cuts[layer]) & held)))

    def expected(self, layer: int) -> dict[str, float]:
        """Held-out estimates at the current threshold: recall, precision, predicted share."""
        t, r = self.thresholds[layer], float(self.pos_rate[layer])
        tpr, fpr = share_above(self.pos_quantiles[layer], t), share_above(self.neg_quantiles[layer], t)
        predicted = r * tpr + (1 - r) * fpr
        return {"recall": tpr, "precision": r * tpr / predicted if predicted > 0 else 1.0, "predicted": predicted}

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "lowrank"))

    def nbytes(self) -> int:
        """DRAM the predictors hold at run time (counted inside the flash memory budget)."""
        return sum(L.nbytes() for L in self.layers)


def _ids(m: Tensor) -> Tensor:
    """(T, n) bool -> sorted ids named by any token."""
    return torch.nonzero(m[0] if m.shape[0] == 1 else m.any(dim=0)).flatten()


def __getattr__(name: str) -> Any:
    """The file functions live in llmflash.predictor_file; importable from here as before."""
    if name in ("load_predictors", "read_predictors", "save_predictors", "hot_split"):
        from . import predictor_file

        return getattr(predictor_file, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
