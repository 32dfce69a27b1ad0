"""Building flash for a store: the wanted-set source, each layer's state (one pass over the store),
the memory plan (budget.plan_caches, once), the reader and the layers' caches."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ...budget import CachePlan, parse_memory, plan_caches
from ...device import on_cpu
from ...errors import InvalidArgumentError
from ...io import AlignedBuf, NeuronCache, Profile, Reader, as_tensor, load_profile
from ...sparsity import NextLayerGuess, SameLayerGuess, WantedSource, make_source
from ...sparsity.neurons import order_inverse
from ...store import PREDICTORS, RESIDENT, Store
from .device_rows import check_device_options
from .layer import FlashLayer
from .options import FlashOptions

SCRATCH_NEURONS = 1024  # overflow chunk: rows streamed at a time when a layer's cache is full
URING_DEPTH = 128  # reads in flight on the default io_uring engine (a virtio disk's queue holds 256)
POOL_THREADS = 32  # reads in flight with the pread pool ("auto", "threads")


def model_bytes(store: Store) -> tuple[int, int]:
    """(resident bytes, FFN payload bytes) of a store: what 1.0x of the memory budget means. The
    resident part includes the per-bundle CRC-32 tables (4 B a neuron) that the caches hold."""
    resident = (store.path / RESIDENT).stat().st_size
    if store.has_bundle_crcs:
        resident += 4 * sum(L.n_neurons for L in store.layers)
    return resident, sum(L.payload_bytes for L in store.layers)


@dataclass
class FlashSetup:
    """Everything FlashFFN holds besides its counters."""

    source: WantedSource
    layers: list[FlashLayer]
    plan: CachePlan
    model_bytes: int  # what 1.0x of the budget means
    profile: Profile
    reader: Reader
    scratch: AlignedBuf  # the overflow area every layer streams through
    scratch_rows: Tensor  # (rows, bundle_values) view of it
    scratch_device: Tensor | None  # on a GPU: where each overflow chunk goes up to (same shape)


def build(store: Store, opts: FlashOptions) -> FlashSetup:
    """Source, layers, plan, reader and caches for `store` under `opts` (a BudgetError when the
    budget does not cover what must stay resident). On a GPU (`opts.device`) the cache rows,
    pinned rows, biases and an overflow scratch live there (device_rows.py)."""
    device = opts.device if opts.device is not None and not on_cpu(opts.device) else None
    if device is not None:
        check_device_options(store, device)
    source = wanted_source(store, opts)
    resident, ffn = model_bytes(store)
    budget = parse_memory(opts.memory, resident + ffn) if opts.memory is not None else resident + ffn
    layers = read_layers(store, getattr(source, "hot", None), device)
    # The predictors stay in DRAM too: inside the budget (the oracle is a measurement aid outside it,
    # as documented). OPT's fc1 biases are counted at the resident file's store-dtype size.
    fixed = resident + int(getattr(source, "nbytes", lambda: 0)()) + sum(lay.resident_bytes() for lay in layers)
    bb = store.layers[0].bundle_bytes
    plan = plan_caches(
        budget,
        fixed,
        [lay.n_cold for lay in layers],
        bb,
        scratch_neurons=SCRATCH_NEURONS,
        store_name=str(store.path),
        reuse=opts.reuse,
    )
    profile = opts.profile if opts.profile is not None else load_profile()
    reader = open_reader(store, opts)
    for lay, cap in zip(layers, plan.capacities):
        open_cache(store, lay, cap, reader, profile, opts, device)
    rows = plan.scratch // bb
    scratch = AlignedBuf(max(1, rows) * bb)
    scratch_rows = bundle_view(store, scratch, rows)
    up = None if device is None else torch.empty_like(scratch_rows, device=device)
    return FlashSetup(source, layers, plan, resident + ffn, profile, reader, scratch, scratch_rows, up)


def wanted_source(store: Store, opts: FlashOptions) -> WantedSource:
    """The source `opts.sparsity` names, wrapped for lookahead when it cannot guess by itself."""
    sparsity = opts.sparsity
    if sparsity is None:
        # The calibrated predictors when the store has them; else the oracle (an upper bound that
        # holds the full FFN outside the budget: `llmflash calibrate` to deploy).
        sparsity = "predictor" if (store.path / PREDICTORS).is_file() else "oracle"
        if sparsity == "oracle":
            warnings.warn(
                f"{store.path}: no predictors (run `llmflash calibrate`); using the oracle, "
                "which keeps the full FFN in DRAM outside the memory budget",
                stacklevel=5,
            )
    source = make_source(sparsity, store, hot=opts.hot)
    if opts.lookahead == "layer" and not hasattr(source, "ahead"):
        source = NextLayerGuess(source)
    if opts.lookahead == "attention" and not store.config.pre_norm:
        raise InvalidArgumentError(
            f"{store.path}: lookahead='attention' needs a pre-norm model (the guess "
            "reads the FFN norm of the attention input); use lookahead='layer'"
        )
    if opts.lookahead == "attention" and not hasattr(source, "early"):
        source = SameLayerGuess(source)
    return source


def read_layers(store: Store, hot: list[Tensor] | None, device: torch.device | None = None) -> list[FlashLayer]:
    """Each layer's state but its cache: the id -> position map, the fc1 biases and the hot
    neurons' bundles (`hot`: original ids per layer, the source's pinned share), read into
    resident rows that are computed every token and never named to the caches (on `device`
    when one is given)."""
    layers = []
    for i, (L, bias) in enumerate(zip(store.layers, store.up_biases())):
        if bias is not None and device is not None:
            bias = bias.to(device)
        inverse = order_inverse(L.order)
        lay = FlashLayer(L, None if inverse is None else inverse.numpy(), bias, None, None, q=store.q_bundles(i))
        ids = hot[i] if hot is not None and i < len(hot) else []
        if len(ids):
            pos = np.sort(lay.positions(ids).astype(np.int64))
            lay.hot_rows = store.read_bundles(i, pos)
            lay.hot_bias = None if bias is None else bias[torch.from_numpy(pos).to(bias.device)]
            if device is not None:
                lay.hot_rows = lay.hot_rows.to(device)
        layers.append(lay)
    return layers


def open_reader(store: Store, opts: FlashOptions) -> Reader:
    """The reader of ffn.bin. Default: io_uring with URING_DEPTH reads in flight (a layer's ~390
    reads at OPT-6.7B's scale go out in a few submissions and the filling thread sleeps until they
    are done, leaving the cores to the compute that overlaps them; faster than the pread pool,
    with or without lookahead); the pread pool where the kernel refuses io_uring. "auto": io_uring
    for small batches, the pread pool for large."""
    if opts.engine is None:
        try:
            return Reader(store.ffn_path, concurrency=opts.concurrency or URING_DEPTH, engine="io_uring")
        except (OSError, ValueError, RuntimeError):  # no io_uring here (seccomp, old kernel)
            return Reader(store.ffn_path, concurrency=opts.concurrency or POOL_THREADS)
    return Reader(store.ffn_path, concurrency=opts.concurrency or POOL_THREADS, engine=opts.engine)


def open_cache(
    store: Store,
    lay: FlashLayer,
    capacity: int,
    reader: Reader,
    profile: Profile,
    opts: FlashOptions,
    device: torch.device | None = None,
) -> None:
    """The layer's NeuronCache of `capacity` rows; every bundle read is checked against its CRC-32
    as it lands (a StoreError) when the store has them. New neurons take the rows evictions
    emptied (no move: rust/cache.rs, set_fill_holes), so the compute that overlaps the reads takes
    every row but the admission's filled_rows; fill_holes False is the paper's scheme (each hole
    closed by moving the last live row in, new neurons appended), whose moves run before the
    reads start. On a GPU (`device`) the rows are a tensor there and the cache keeps only the
    index (external rows, device_rows.py)."""
    L = lay.region
    cache = NeuronCache(
        reader,
        L.offset,
        L.n_neurons,
        L.bundle_bytes,
        capacity,
        opts.window,
        profile=profile,
        allow_whole=opts.coalesce,
        max_gap_bytes=None if opts.coalesce else 0,
        external_rows=device is not None,
    )
    crcs = store.bundle_crcs(L.index)
    if crcs is not None:
        cache.set_bundle_crcs(crcs)
    cache.fill_holes = opts.fill_holes
    lay.cache = cache
    if device is None:
        lay.rows = bundle_view(store, cache.slots, capacity)
    else:
        lay.rows = torch.zeros(capacity, store.config.bundle_values, dtype=store.dtype, device=device)
    lay.overflow = cache.overflow_reader()


def bundle_view(store: Store, buf: AlignedBuf, rows: int) -> Tensor:
    """The first `rows` bundles of `buf` as a (rows, bundle_values) tensor of the store's dtype;
    a quantized store's as (rows, bundle_bytes) uint8."""
    if store.quant:
        bb = store.layers[0].bundle_bytes
        return as_tensor(buf, torch.uint8)[: rows * bb].view(rows, bb)
    n = rows * store.config.bundle_values
    return as_tensor(buf, store.dtype)[:n].view(rows, store.config.bundle_values)
