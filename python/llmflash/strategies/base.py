"""The one interface every FFN strategy implements (dense, naive, flash), so the transformer and
`bench` treat them alike.

An FFN strategy maps a layer's FFN input x (T, D) to

    y = sum over neurons i of  act_i(x) * down_i          (T, D)
    act_i(x) = act(x . gate_i) * (x . up_i)               gated (SwiGLU: Llama, OpenELM)
             = act(x . up_i + bias_i)                     plain (OPT: fc1 with its bias)

where gate_i, up_i, down_i (D,) are neuron i's bundle fields. OPT's fc2 bias is not a neuron's:
the transformer adds it from the resident weights. A strategy that admits only some neurons
returns the same sum over those; with every neuron admitted it must equal `dense`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from ..models.layers import ACTIVATIONS, linear


@runtime_checkable
class FFN(Protocol):
    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) in the store dtype -> (T, D), in the store dtype or float32."""
        ...


def bundle_ffn(x: Tensor, up: Tensor, down: Tensor, gate: Tensor | None = None,
               bias: Tensor | None = None, act: str = "silu") -> Tensor:
    """The FFN over a set of neurons given as rows: x (T, D); up, gate, down (n, D); bias (n,).
    Returns (T, D) float32.

    The rows may be strided views into a bundle matrix (store.split_bundles): `linear` reads
    gate/up in place with the bundle length as row stride (and upcasts for many rows). The down rows are in the slow layout
    for half-precision products (models/layers.py), so half-precision down rows are upcast for
    the call (measured here: 0.2 ms against 0.7 ms for 1536 x 576 float16 rows).
    """
    f = ACTIVATIONS[act]
    h = linear(x, up)                                                     # (T, n)
    if gate is not None:
        if bias is not None:
            raise ValueError("a gated FFN with an fc1 bias is not a supported layout")
        h = f(linear(x, gate)) * h                                        # (T, n)
    else:
        if bias is not None:
            h = h + bias.float()
        h = f(h)
    return torch.matmul(h, down.float())                                  # (T, D)
