"""FFN strategies, all behind one interface (strategies/base.py) so `bench` compares them in
one run: `dense` keeps every neuron in DRAM (the exactness reference); `naive` reads every
layer's whole FFN from flash each token (the paper's baseline); `flash` keeps a windowed neuron cache per layer under a memory
budget and reads only the missing neurons."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidArgumentError
from ..store import Store

STRATEGIES = ("dense", "naive", "flash")


def make_ffn(name: str, store: Store, **options: Any):
    if name == "dense":
        from .dense import DenseFFN
        if options:
            raise InvalidArgumentError(f"strategy 'dense' takes no options, got {sorted(options)}")
        return DenseFFN(store)
    if name == "naive":
        from .naive import NaiveFFN
        return NaiveFFN(store, **options)
    if name == "flash":
        from .flash import FlashFFN
        return FlashFFN(store, **options)
    raise InvalidArgumentError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
