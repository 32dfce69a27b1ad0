"""Wanted-set sources: which FFN neurons a token needs, behind one interface.

    source(layer, x) -> LongTensor of original neuron ids (sorted, unique), x: (T, D) FFN input

- `AllNeurons`: every neuron (exactness: flash must then equal dense).
- `Oracle`: the true activations, computed from the full FFN weights (kept in DRAM outside the
  budget: an upper bound for tests and benchmarks, not a deployment mode). ReLU models: neurons
  with act > 0. SwiGLU models: the `keep` share of neurons with the largest |silu(gate) * up|
  per token (the magnitude sparsity of CATS/TEAL), unioned over the tokens of x.
- `Threshold`: like Oracle, but keeps |act| above a per-layer threshold instead of a fixed share.
The learned predictors (llmflash.predictor) implement the same call. A source may be sticky
(`sticky = True` and `select(layer, x, cached)`, cached: (n,) bool of the neurons the layer's
cache holds): flash then names the set with what the cache holds in view (predictors with a
stay recall: hysteresis, Predictors.select).

Lookahead (llmflash.strategies.flash): a source may also have `ahead(layer, x)`, layer+1's set
named from layer's FFN input, so layer+1's reads start while layer computes. With
`ahead_exact = True` that set is final (the benches' exact replay); otherwise it is a guess that
flash checks at layer+1 against the source's own answer, reading what the guess missed.
`NextLayerGuess(source)` gives any source such a guess. A source may instead (or also) have
`early(layer, x)`: the layer's own set guessed from the FFN norm of the layer's *attention*
input, before attention runs, so the reads overlap the layer's attention; `SameLayerGuess`
gives any source that guess (its own rule on that earlier input).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from .errors import InvalidArgumentError
from .models.config import ModelConfig
from .store import Store, split_bundles


class WantedSource(Protocol):
    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor: ...


class _Guess:
    """A source wrapped to guess early: calls and predictor memory are the source's own."""

    def __init__(self, source: WantedSource):
        self.source = source

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.source(layer, x)

    def nbytes(self) -> int:
        return int(getattr(self.source, "nbytes", lambda: 0)())

    @property
    def sticky(self) -> bool:
        return bool(getattr(self.source, "sticky", False))

    @property
    def hot(self) -> list[torch.Tensor] | None:
        return getattr(self.source, "hot", None)

    def select(self, layer: int, x: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        return self.source.select(layer, x, cached)


class NextLayerGuess(_Guess):
    """Lookahead for any source: layer+1's wanted set guessed by running the source's layer+1
    rule on layer's FFN input (the residual stream changes little from one layer to the next:
    Deja Vu's asynchronous lookahead, here with no extra predictor and no extra memory). Flash
    starts the guess's reads during layer, then asks the source at layer+1 and reads only what
    the guess missed; with compute="wanted" what is computed does not depend on the guess. The
    source must not keep per-call state (the benches' Replay counts calls: give such a source
    its own `ahead`)."""

    ahead_exact = False

    def ahead(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.source(layer + 1, x)


class SameLayerGuess(_Guess):
    """The layer's set guessed before its attention: the source's own rule on ffn_norm(h), h the
    residual entering the layer (the FFN's real input is ffn_norm(h + attention(h))). Checked
    at the FFN like NextLayerGuess; the reads overlap the layer's attention. The source is asked
    twice per layer and token, so it must not keep per-call state (give such a source its own
    `early`, as the benches' GuessReplay does)."""

    def early(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.source(layer, x)


class AllNeurons:
    def __init__(self, config: ModelConfig):
        self.ids = [torch.arange(n) for n in config.ffn_dims]

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.ids[layer]


class _FullActivations:
    """Computes every neuron's activation from the store's full FFN weights (float32)."""

    def __init__(self, store: Store):
        self.config = store.config
        self.weights = []
        biases = store.up_biases()                           # (n,) float32 per layer, store order
        for i, L in enumerate(store.layers):
            parts = split_bundles(store.read_layer(i).float(), store.config)
            if biases[i] is not None:
                parts["bias"] = biases[i]
            if L.order is not None:                          # back to original neuron ids
                inv = torch.empty(L.n_neurons, dtype=torch.long)
                inv[torch.tensor(L.order)] = torch.arange(L.n_neurons)
                parts = {k: v[inv] for k, v in parts.items()}
            self.weights.append(parts)

    def activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w, x = self.weights[layer], x.float()                # x: (T, D)
        up = x @ w["up"].T                                   # (T, N)
        if "bias" in w:
            up = up + w["bias"]
        if self.config.gated:
            return F.silu(x @ w["gate"].T) * up
        return F.relu(up) if self.config.act == "relu" else F.gelu(up)


class Oracle(_FullActivations):
    def __init__(self, store: Store, keep: float = 0.5):
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < keep <= 1.0:
            raise InvalidArgumentError(f"oracle keep must be a share of the neurons in (0, 1], not {keep!r}")
        super().__init__(store)
        self.keep = keep

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        act = self.activations(layer, x)                     # (T, N)
        if not self.config.gated and self.config.act == "relu":
            return torch.nonzero((act > 0).any(dim=0)).flatten()
        k = max(1, int(round(self.keep * act.shape[1])))
        top = torch.topk(act.abs(), k, dim=1).indices        # (T, k)
        return torch.unique(top)


class Threshold(_FullActivations):
    def __init__(self, store: Store, thresholds: list[float]):
        super().__init__(store)
        self.thresholds = thresholds

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        act = self.activations(layer, x)
        return torch.nonzero((act.abs() > self.thresholds[layer]).any(dim=0)).flatten()
