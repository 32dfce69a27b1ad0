"""The memory budget: how much DRAM the weights may use, and what that leaves for neuron caches.

`--memory` takes an absolute size ("150MB", "1.5GiB", "800000000") or a share of the model's
weights ("0.5x", "50%"). The budget covers the resident part (embeddings, attention, norms, LM
head), the predictors, the per-layer neuron caches and one scratch area for neurons that a token
wants beyond a full cache. What remains after the fixed parts is split across layers in
proportion to their FFN size, so every layer caches the same share of its neurons.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import BudgetError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
}


def parse_memory(spec: str | int | float, model_bytes: int) -> int:
    """Bytes allowed for weights. `model_bytes` is what 1.0x (100%) means."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not math.isfinite(spec) or spec <= 0:
            raise BudgetError(f"memory budget must be a positive number of bytes, got {spec}")
        return int(spec)
    s = str(spec).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(x|%)", s)
    if m:
        frac = float(m.group(1)) / (100.0 if m.group(2) == "%" else 1.0)
        if not math.isfinite(frac):
            raise BudgetError(f"memory budget {spec!r} is too large")
        if frac <= 0:
            raise BudgetError(f"memory budget {spec!r} must be positive")
        return int(frac * model_bytes)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise BudgetError(f"cannot parse memory budget {spec!r}: use e.g. 150MB, 1.5GiB, 0.5x or 50%")
    number = float(m.group(1))
    if not math.isfinite(number):
        raise BudgetError(f"memory budget {spec!r} is too large")
    value = int(number * _UNITS[m.group(2)])
    if value <= 0:
        raise BudgetError(f"memory budget {spec!r} must be positive")
    return value


def format_bytes(n: int, up: bool = False) -> str:
    """n bytes in the unit that shows it best (B, KB, MB, GB, TB: powers of 1000, as --memory
    reads them), to one decimal; up=True rounds up, so the figure is never below n."""
    if n < 1000:
        return f"{int(n)} B"
    for unit, size in (("KB", 10**3), ("MB", 10**6), ("GB", 10**9), ("TB", 10**12)):
        v = math.ceil(n * 10 / size) / 10 if up else round(n / size, 1)
        if v < 1000 or unit == "TB":
            return f"{v:.1f} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class CachePlan:
    budget: int  # bytes for weights in all
    resident: int  # embeddings, attention, norms, LM head, predictors, pinned hot neurons
    scratch: int  # one layer's overflow area (reused by every layer)
    capacities: tuple[int, ...]  # cache slots (neurons) per layer

    @property
    def cache_bytes_total(self) -> int:
        return self.budget - self.resident - self.scratch


def plan_caches(
    budget: int,
    resident_bytes: int,
    ffn_dims: list[int],
    bundle_bytes: int,
    scratch_neurons: int,
    store_name: str = "",
    reuse: bool = True,
) -> CachePlan:
    """Split what the budget leaves after the fixed parts into per-layer capacities.

    `ffn_dims`: the neurons each layer's cache may have to hold. When some layer's capacity falls
    short of its size (or `reuse` is False: no cache at all, every wanted neuron streams), a
    token's overflow streams through one scratch area of `scratch_neurons` rows (at most the
    widest layer), reserved inside the budget before the capacities are split. A BudgetError when
    the budget does not cover the resident part, then when it does not cover the scratch area too.
    """
    _check_fixed(budget, resident_bytes, 0, store_name)
    caps = _capacities(budget - resident_bytes, ffn_dims, bundle_bytes)
    if not reuse:
        caps = (0,) * len(ffn_dims)
    if not any(c < n for c, n in zip(caps, ffn_dims)):
        return CachePlan(budget, resident_bytes, 0, caps)
    scratch = min(scratch_neurons, max(ffn_dims)) * bundle_bytes
    _check_fixed(budget, resident_bytes, scratch, store_name)
    if reuse:
        caps = _capacities(budget - resident_bytes - scratch, ffn_dims, bundle_bytes)
    return CachePlan(budget, resident_bytes, scratch, caps)


def _check_fixed(budget: int, resident_bytes: int, scratch: int, store_name: str) -> None:
    """A BudgetError unless the budget covers the resident part and `scratch` bytes."""
    fixed = resident_bytes + scratch
    if budget < fixed:
        raise BudgetError(
            f"memory budget {format_bytes(budget)} is below what must stay resident "
            f"({format_bytes(resident_bytes)} of embeddings/attention/norms, predictors and hot neurons + "
            f"{format_bytes(scratch)} scratch); "
            f"use at least {format_bytes(fixed, up=True)}",
            store_name or None,
        )


def _capacities(free: int, ffn_dims: list[int], bundle_bytes: int) -> tuple[int, ...]:
    """Per-layer cache slots from `free` bytes: every layer the same share of its neurons."""
    total = sum(ffn_dims)
    share = min(1.0, free / (total * bundle_bytes)) if total else 1.0
    return tuple(min(n, int(share * n)) for n in ffn_dims)
