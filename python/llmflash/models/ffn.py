"""The interface between the transformer and its FFN: the model holds attention and norms, and
asks an FFN object (an llmflash.strategies strategy: dense, naive, flash) for each layer's FFN.

An FFN maps a layer's FFN input x (T, D) to

    y = sum over neurons i of  act_i(x) * down_i          (T, D)
    act_i(x) = act(x . gate_i) * (x . up_i)               gated (SwiGLU: Llama, OpenELM)
             = act(x . up_i + bias_i)                     plain (OPT: fc1 with its bias)

where gate_i, up_i, down_i (D,) are neuron i's weights and bias_i its fc1 bias. OPT's fc2 bias
is not a neuron's: the transformer adds it. An FFN that computes only some neurons returns the
same sum over those; with every neuron it must equal the dense FFN.

An FFN may also have `early(layer, x)`: called with the layer's FFN-norm of the residual before
attention runs (pre-norm models), so it can start work for that layer (flash: guess the neurons
and begin reading them) while attention computes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class FFN(Protocol):
    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) in the model dtype -> (T, D), in the model dtype or float32."""
        ...
