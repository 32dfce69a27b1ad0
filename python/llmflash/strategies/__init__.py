"""FFN strategies, all behind one interface (strategies/base.py) so `bench` compares them in
one run: `dense` keeps every neuron in DRAM (the exactness reference); `naive` reads every
layer's whole FFN from flash each token (the paper's baseline)."""

from __future__ import annotations

from typing import Any

from ..store import Store

STRATEGIES = ("dense", "naive")


def make_ffn(name: str, store: Store, **options: Any):
    if name == "dense":
        from .dense import DenseFFN
        if options:
            raise ValueError(f"strategy 'dense' takes no options, got {sorted(options)}")
        return DenseFFN(store)
    if name == "naive":
        from .naive import NaiveFFN
        return NaiveFFN(store, **options)
    raise ValueError(f"unknown strategy {name!r} (choose from {', '.join(STRATEGIES)})")
