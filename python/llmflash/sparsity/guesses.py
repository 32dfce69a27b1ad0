"""Early guesses of a wanted set, for any source, so reads can start before the set is final.

- `NextLayerGuess(source)`: layer+1's set guessed from layer's FFN input (`ahead`).
- `SameLayerGuess(source)`: the layer's set guessed from its attention input (`early`).
Flash checks either guess against the source's own answer and reads what the guess missed.
"""

from __future__ import annotations

import torch

from .source import WantedSource


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
