"""Flash I/O from Python: a thin layer over the Rust core (llmflash._native).

    reader = Reader(store.ffn_path)                       # O_DIRECT, 32 reads in flight
    ids, rows = read_neurons(reader, store.layers[3], wanted)   # rows: (len(ids), bundle_bytes) uint8

    cache = layer_cache(reader, store.layers[3], capacity=256, window=4)
    adm = cache.begin(wanted, step)        # evict, plan, start reads (background)
    rows = cache_rows(cache, torch.float16) # (capacity, bundle_values), zero-copy
    ... rows[:adm.ready_rows] usable now; cache.wait(); rows[:adm.total_rows] ...
    cache.read_neurons(adm.overflow, scratch)   # what did not fit, packed row by row

`wanted` are store positions (bundle j of the region; see LayerRegion.order for the original
neuron ids). The planner chooses exact bundles, bridged runs or one span (the first wanted page to
the last), whichever the disk profile (load_profile: the one `llmflash profile-disk` measured,
else a default table) prices cheapest.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, Union

import numpy as np

from ._native import (
    ALIGN,
    DEFAULT_CONCURRENCY,
    Admission,
    AlignedBuf,
    NeuronCache,
    OverflowReader,
    Plan,
    Profile,
    Reader,
    combine_crcs,
    measure,
    measure_point,
    plan,
)

if TYPE_CHECKING:
    import torch

    from .store import LayerRegion

__all__ = [
    "ALIGN",
    "DEFAULT_CONCURRENCY",
    "Admission",
    "combine_crcs",
    "AlignedBuf",
    "NeuronCache",
    "OverflowReader",
    "Plan",
    "Profile",
    "Reader",
    "plan",
    "measure",
    "measure_point",
    "plan_layer",
    "read_neurons",
    "layer_cache",
    "cache_rows",
    "as_array",
    "as_tensor",
    "default_profile_path",
    "load_profile",
]

Ids = Union[np.ndarray, Sequence[int]]


def default_profile_path() -> Path:
    """Where `llmflash profile-disk` saves this machine's disk profile (the user's cache folder)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmflash" / "disk-profile.json"


def load_profile(path: str | os.PathLike[str] | None = None) -> Profile:
    """The measured profile (default location: default_profile_path()), or the built-in default
    table (Profile.default()) when none was measured; a corrupt file is reported with a warning,
    never fatal."""
    p = Path(path) if path is not None else default_profile_path()
    if not p.is_file():
        return Profile.default()
    try:
        return Profile.load(p)
    except (ValueError, OSError) as e:
        warnings.warn(
            f"ignoring disk profile {p}: {e}; using the default profile (re-run `llmflash profile-disk`)",
            RuntimeWarning,
            stacklevel=2,
        )
        return Profile.default()


def plan_layer(
    region: "LayerRegion",
    wanted: Ids,
    profile: Profile | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    **options,
) -> Plan:
    """Plan the reads of `wanted` store positions of one layer region (options: see plan())."""
    if profile is None:
        profile = load_profile()
    return plan(
        wanted,
        region.bundle_bytes,
        region.offset,
        region.n_neurons,
        profile=profile,
        concurrency=concurrency,
        **options,
    )


def read_neurons(
    reader: Reader, region: "LayerRegion", wanted: Ids, profile: Profile | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read the bundles of `wanted` (store positions) from one layer region.

    Returns (ids, rows): the unique ids sorted (int64) and a (len(ids), bundle_bytes) uint8 array
    whose row k is bundle ids[k], viewing a Rust-owned buffer (no copy).
    """
    p = plan_layer(region, wanted, profile, concurrency=reader.concurrency)
    rows = p.gather(reader.read_plan(p))
    return p.neurons, as_array(rows).reshape(len(p.neurons), region.bundle_bytes)


def layer_cache(
    reader: Reader, region: "LayerRegion", capacity: int, window: int, profile: Profile | None = None, **options
) -> NeuronCache:
    """A NeuronCache of `capacity` rows for one layer region (options: see plan())."""
    if profile is None:
        profile = load_profile()
    return NeuronCache(
        reader, region.offset, region.n_neurons, region.bundle_bytes, capacity, window, profile=profile, **options
    )


def cache_rows(cache: NeuronCache, dtype: "torch.dtype") -> "torch.Tensor":
    """The cache's slot matrix as a (capacity, bundle_bytes // itemsize) tensor (no copy)."""
    import torch

    item = torch.empty(0, dtype=dtype).element_size()
    if cache.bundle_bytes % item:
        raise ValueError(f"bundle of {cache.bundle_bytes} bytes is not a whole number of {dtype} values")
    return as_tensor(cache.slots, dtype).view(cache.capacity, cache.bundle_bytes // item)


def as_array(buf: AlignedBuf, dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """A numpy view of `buf` (no copy; keeps `buf` alive)."""
    return np.frombuffer(buf, dtype=dtype) if len(buf) else np.empty(0, dtype=dtype)


def as_tensor(buf: AlignedBuf, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
    """A torch view of `buf` (no copy: data_ptr() == buf.address; keeps `buf` alive)."""
    import torch

    dtype = dtype or torch.uint8
    if len(buf) == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype)
