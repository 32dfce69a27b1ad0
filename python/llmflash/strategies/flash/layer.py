"""One layer's part of flash: its neuron cache, the map from original neuron ids to store
positions, OPT's fc1 biases and the pinned hot neurons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...io import Admission, NeuronCache, OverflowReader
from ...models.quant import QBundles
from ...store import LayerRegion


@dataclass
class FlashLayer:
    """A layer's state. Sources name original neuron ids; the cache, the bundles and the biases
    are in store order (a store may keep a layer's neurons permuted: LayerRegion.order)."""

    region: LayerRegion
    position: np.ndarray | None  # original neuron id -> store position (int64); None: the same
    bias: Tensor | None  # OPT's fc1 biases (n,) float32, store order, resident
    hot_rows: Tensor | None  # pinned bundles (k, bundle_values): resident, computed every token
    hot_bias: Tensor | None  # their fc1 biases (k,)
    cache: NeuronCache | None = None
    overflow: OverflowReader | None = None  # the cache's read_neurons, for the overflow worker thread
    rows: Tensor | None = None  # (capacity, bundle_values) view of the cache's slot matrix
    q: QBundles | None = None  # quantized stores: the bundle format and resident down scales

    @property
    def n_neurons(self) -> int:
        return self.region.n_neurons

    @property
    def n_cold(self) -> int:
        """Neurons the cache may have to hold: all but the pinned ones."""
        return self.n_neurons - (0 if self.hot_rows is None else len(self.hot_rows))

    def resident_bytes(self) -> int:
        """DRAM the pinned rows and their biases take (inside the budget; the down scales of a
        quantized store are in resident.safetensors, counted with it)."""
        return sum(t.numel() * t.element_size() for t in (self.hot_rows, self.hot_bias) if t is not None)

    def positions(self, ids: Any) -> np.ndarray:
        """Original neuron ids -> store positions (uint32), as the cache takes them."""
        ids = ids.numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        return (self.position[ids] if self.position is not None else ids).astype(np.uint32, copy=False)

    def live_mask(self) -> Tensor:
        """(n,) bool over original neuron ids: live in the cache."""
        live = np.zeros(self.n_neurons, dtype=bool)
        live[self.cache.slot_neurons()] = True
        return torch.from_numpy(live if self.position is None else live[self.position])

    def row_bias(self) -> Tensor | None:
        """The fc1 bias of each cache row (OPT), by the row's store position; None without biases.
        After begin, the row -> position map covers rows [0, total_rows) even while reads are
        pending."""
        if self.bias is None:
            return None
        return self.bias[torch.from_numpy(self.cache.slot_neurons()).to(self.bias.device)]

    def rows_to_compute(self, adm: Admission, wanted: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """(ready, filling): the sorted cache rows to compute, split into those live before this
        admission and those its reads fill. `wanted` (store positions): only the rows holding
        them (compute="wanted"; those that overflowed the cache are not live); None: every live
        row.

        The split follows the admission, never whether the reads are done by now: a split that
        depended on timing would change the float summation order from run to run, and a
        discontinuous selection (top-k, thresholds) turns such last-bit differences into different
        neurons and visibly different logits (seen: 0.7 on SmolLM2's logits after 40 tokens)."""
        n = adm.total_rows
        filling = np.zeros(n, dtype=bool)
        filling[adm.filled_rows] = True
        if wanted is not None:
            pick = self.cache.rows_of(wanted)
            pick = np.sort(pick[(pick >= 0) & (pick < n)])
            pick = pick[np.diff(pick, prepend=-1) != 0]  # a duplicated id counts once (rows are >= 0)
        else:
            pick = np.arange(n)
        new = filling[pick]
        return pick[~new], pick[new]
