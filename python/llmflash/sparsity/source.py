"""Wanted-set sources: which FFN neurons a token needs, behind one interface.

    source(layer, x) -> LongTensor of original neuron ids (sorted, unique), x: (T, D) FFN input

`make_source` turns a sparsity spec ('all', 'oracle[:KEEP]', 'predictor[:RECALL[/STAY]]') or a
callable into a source: the rules (llmflash.sparsity.rules) or the calibrated predictors.

A source may be sticky (`sticky = True` and `select(layer, x, cached)`, cached: (n,) bool of the
neurons the layer's cache holds): flash then names the set with what the cache holds in view
(predictors with a stay recall: hysteresis, Predictors.select).

Lookahead: a source may also have `ahead(layer, x)`, layer+1's set named from layer's FFN input,
so layer+1's reads start while layer computes. With `ahead_exact = True` that set is final (the
benches' exact replay); otherwise it is a guess that flash checks at layer+1 against the source's
own answer, reading what the guess missed. A source may instead (or also) have `early(layer, x)`:
the layer's own set guessed from the FFN norm of the layer's *attention* input, before attention
runs, so the reads overlap the layer's attention (llmflash.sparsity.guesses gives any source
either guess).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

from ..errors import InvalidArgumentError
from ..store import Store
from .predictors_file import load_predictors
from .rules import AllNeurons, Oracle


class WantedSource(Protocol):
    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


def _share(spec: Any, what: str, value: str) -> float:
    """A number in (0, 1] parsed from `value`, the `what` part of the sparsity spec `spec`."""
    try:
        v = float(value)
    except ValueError:
        v = math.nan
    if not 0.0 < v <= 1.0:  # also NaN
        raise InvalidArgumentError(f"sparsity {spec!r}: {what} must be a number in (0, 1], not {value!r}")
    return v


def make_source(spec: str | WantedSource, store: Store, hot: float = 0.0) -> WantedSource:
    """'all', 'oracle' (ReLU: act > 0; SwiGLU: top 50% by |act|), 'oracle:0.3', 'predictor',
    'predictor:RECALL', 'predictor:RECALL/STAY' (hysteresis: Predictors.select), or a callable.
    `hot` pins that share of each layer's neurons (predictors only: read_predictors)."""
    try:
        hot_ok = 0.0 <= float(hot) < 1.0  # also rejects NaN
    except (TypeError, ValueError):
        hot_ok = False
    if not hot_ok or isinstance(hot, bool):
        raise InvalidArgumentError(f"hot share must be a number in [0, 1), not {hot!r}")
    hot = float(hot)
    if hot and not str(spec).startswith("predictor"):
        raise InvalidArgumentError(
            f"hot pinning needs the calibrated predictors (their per-neuron rates), not "
            f"{spec!r}; for a ready source, pin with load_predictors(store, hot=...)"
        )
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise InvalidArgumentError(
            f"sparsity must be a string (all, oracle[:KEEP], predictor[:RECALL[/STAY]]) "
            f"or a callable source, not {spec!r}"
        )
    name, colon, arg = spec.partition(":")
    if name == "all":
        if colon:
            raise InvalidArgumentError(f"sparsity {spec!r}: 'all' takes no argument")
        return AllNeurons(store.config)
    if name == "oracle":
        keep = _share(spec, "KEEP (the share of neurons kept per token)", arg) if arg else 0.5
        return Oracle(store, keep=keep)
    if name == "predictor":
        recall, _, stay = arg.partition("/")
        r = _share(spec, "RECALL", recall) if recall else None
        st = _share(spec, "STAY", stay) if stay else None
        if r is not None and st is not None and st < r:
            raise InvalidArgumentError(
                f"sparsity {spec!r}: STAY ({st}) must be >= RECALL ({r}): a cached neuron "
                "would need a higher score to stay than a new one to enter"
            )
        return load_predictors(store, recall=r, stay=st, hot=hot)
    raise InvalidArgumentError(f"unknown sparsity {spec!r}: use all, oracle[:KEEP] or predictor[:RECALL[/STAY]]")
