"""Wanted-set rules that need no calibration.

- `AllNeurons`: every neuron (exactness: flash must then equal dense).
- `Oracle`: the true activations, computed from the full FFN weights (kept in DRAM outside the
  budget: an upper bound for tests and benchmarks, not a deployment mode). ReLU models: neurons
  with act > 0. SwiGLU models: the `keep` share of neurons with the largest |silu(gate) * up|
  per token (the magnitude sparsity of CATS/TEAL), unioned over the tokens of x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import InvalidArgumentError
from ..models.config import ModelConfig
from ..store import Store, split_bundles
from .neurons import in_original_ids, order_inverse


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
        biases = store.up_biases()  # (n,) float32 per layer, store order
        for i, L in enumerate(store.layers):
            parts = split_bundles(store.read_layer_float(i), store.config)
            if biases[i] is not None:
                parts["bias"] = biases[i]
            inverse = order_inverse(L.order)  # rows back to original neuron ids
            parts = {k: in_original_ids(v, inverse, dim=0) for k, v in parts.items()}
            self.weights.append(parts)

    def activations(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        w, x = self.weights[layer], x.float()  # x: (T, D)
        up = x @ w["up"].T  # (T, N)
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
        return torch.nonzero(self.predict(layer, x).any(dim=0)).flatten()

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """(T, N) bool: each token's own wanted set (the call above is their union)."""
        act = self.activations(layer, x)  # (T, N)
        if not self.config.gated and self.config.act == "relu":
            return act > 0
        k = max(1, int(round(self.keep * act.shape[1])))
        out = torch.zeros(act.shape, dtype=torch.bool)
        out.scatter_(1, torch.topk(act.abs(), k, dim=1).indices, True)
        return out
