"""Neuron placement: store each layer's co-activated neurons side by side, so that what a token
reads from flash is a few long runs of bundles rather than many scattered ones.

    coactivation.py  which neurons each token of a text wants, per layer (the sparsity source's
                     per-token sets), and how many runs a set forms in a given order
    order.py         a layer's order from those sets: sparse Jaccard affinities, a greedy path
                     through them, hot neurons last
    rewrite.py       the store rewritten in the new orders, atomically
    place.py         place_store: the three in a row, with the record the manifest keeps
    settings.py      the defaults (no torch: the command line shows them)

A permutation of a layer's neurons changes nothing in the model's math (every reader maps store
positions to original ids through the manifest's `order`), only where each bundle lies in
ffn.bin. The command: llmflash.commands.place.
"""

from __future__ import annotations

from .place import place_store
from .settings import CHUNK, PLACE_TOKENS

__all__ = ["CHUNK", "PLACE_TOKENS", "place_store"]
