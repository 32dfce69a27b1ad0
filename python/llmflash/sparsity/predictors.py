"""The calibrated predictors of a store as a wanted-set source (Predictors), whichever their kind
(low-rank or shadow layers: both give per-neuron scores). The decision threshold tau is per
layer, chosen for a target recall from the held-out quantile tables (llmflash.sparsity.quantiles),
so another recall needs no recalibration; the file: llmflash.sparsity.predictors_file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .lowrank import LayerPredictor
from .quantiles import expected, threshold_for_recall
from .shadow import ShadowLayer


class Predictors:
    """The calibrated predictors of a store, as a wanted-set source (llmflash.sparsity.source):

    ids = predictors(layer, x)      # x (T, D) -> sorted unique original neuron ids (union over T)
    """

    def __init__(
        self,
        layers: list[LayerPredictor | ShadowLayer],
        thresholds: list[float],
        pos_quantiles: Tensor,
        neg_quantiles: Tensor,
        pos_rate: Tensor,
        label_thresholds: Tensor,
        meta: dict[str, Any],
        path: Path | None = None,
        stay: float | None = None,
        rates: list[Tensor] | None = None,
        hot: list[Tensor] | None = None,
        cold: list[Tensor] | None = None,
    ):
        self.layers = layers
        # Hot pinning (read_predictors(hot=share)): per layer, the `hot` neurons (original ids,
        # the most often active on the calibration text) stay resident and are computed every
        # token; `layers[i]` then predicts only the `cold` ones (original ids of its rows).
        self.rates, self.hot, self.cold = rates, hot, cold
        self.thresholds = thresholds
        self.cuts = [t - L.bias for t, L in zip(thresholds, layers)]  # (n,) float32 per layer
        # Hysteresis (`stay`, a second, higher target recall): a neuron the cache holds stays
        # wanted while its logit clears the lower threshold of that recall (see `select`).
        self.stay = stay
        self.stay_cuts = (
            None if stay is None else [threshold_for_recall(q, stay) - L.bias for q, L in zip(pos_quantiles, layers)]
        )
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
            raise ValueError(
                f"predictor stay recall {stay} is below the recall {recall}: a cached neuron "
                "would need a higher score to stay than a new one to enter"
            )
        th = [threshold_for_recall(q, recall) for q in self.pos_quantiles]
        return Predictors(
            self.layers,
            th,
            self.pos_quantiles,
            self.neg_quantiles,
            self.pos_rate,
            self.label_thresholds,
            {**self.meta, "recall": recall},
            self.path,
            stay=stay,
            rates=self.rates,
            hot=self.hot,
            cold=self.cold,
        )

    def logits(self, layer: int, x: Tensor) -> Tensor:
        return self.layers[layer].logits(x)

    def predict(self, layer: int, x: Tensor) -> Tensor:
        """(T, n) bool: the per-token predictions (logit > threshold, as scores > threshold - bias);
        with hot pinning, hot neurons are always predicted (they are always computed)."""
        m = self.layers[layer].scores(x) > self.cuts[layer]
        if self.cold is None:
            return m
        assert self.hot is not None  # cold and hot are set together
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
        s = self.layers[layer].scores(x)  # (T, n) (cold: (T, n_cold))
        held = cached if self.cold is None else cached[self.cold[layer]]
        return self._to_ids(layer, _ids((s > self.cuts[layer]) | ((s > self.stay_cuts[layer]) & held)))

    def expected(self, layer: int) -> dict[str, float]:
        """Held-out estimates at the current threshold: recall, precision, predicted share."""
        return expected(
            self.pos_quantiles[layer], self.neg_quantiles[layer], float(self.pos_rate[layer]), self.thresholds[layer]
        )

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "lowrank"))

    def nbytes(self) -> int:
        """DRAM the predictors hold at run time (counted inside the flash memory budget)."""
        return sum(L.nbytes() for L in self.layers)


def _ids(m: Tensor) -> Tensor:
    """(T, n) bool -> sorted ids named by any token."""
    return torch.nonzero(m[0] if m.shape[0] == 1 else m.any(dim=0)).flatten()
