"""FFN strategies, all behind the model's FFN interface (models/ffn.py) so `bench` compares them
in one run: `dense` keeps every neuron in DRAM (the exactness reference); `naive` reads every
layer's whole FFN from flash each token (the paper's baseline); `flash` keeps a windowed neuron
cache per layer under a memory budget and reads only the missing neurons."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidArgumentError
from ..store import Store

STRATEGIES = ("dense", "naive", "flash")


def check_strategy(name: str, options: dict[str, Any]) -> None:
    """InvalidArgumentError unless `name` is a strategy that takes `options` (dense takes none)."""
    if name not in STRATEGIES:
        raise InvalidArgumentError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
    if name == "dense" and options:
        raise InvalidArgumentError(f"strategy 'dense' takes no options, got {', '.join(sorted(options))}")


def make_ffn(name: str, store: Store, device: torch.device | None = None, **options: Any):
    """The strategy `name` over `store` with its `options`, computing on `device` (default the
    CPU)."""
    check_strategy(name, options)
    if name != "dense" and store.config.n_experts:  # experts, not neurons, are read and cached
        from .experts import ExpertFFN

        return ExpertFFN(store, name, device=device, **options)
    if name == "dense":
        from .dense import DenseFFN

        return DenseFFN(store, device=device)
    if name == "naive":
        from .naive import NaiveFFN

        return NaiveFFN(store, device=device, **options)
    from .flash import FlashFFN  # "flash", the last of STRATEGIES

    return FlashFFN(store, device=device, **options)
