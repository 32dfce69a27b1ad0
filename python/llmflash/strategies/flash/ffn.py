"""`flash`: the paper's method. Per layer and token:

  1. a wanted-set source (oracle, magnitude rule, or the learned predictors) names the neurons
     the token needs, from the layer's FFN input;
  2. the layer's NeuronCache (Rust) evicts neurons not wanted in the last `window` tokens,
     plans the missing bundles into few large direct-I/O reads (coalescing and bridging by the
     disk profile) and starts them into the rows the evictions emptied, then after the live
     rows; holes left over are closed by moving the last live row in, so the live rows stay one
     block (`fill_holes=False`: the paper's scheme, every hole closed by a move before the reads
     start and new neurons appended);
  3. while those reads are in flight, the FFN runs on the live rows the fill does not write
     (adm.filled_rows); then on the rows just read; neurons beyond the layer's capacity stream
     through one shared scratch buffer in chunks.

Lookahead: a source with `ahead(layer, x)` (layer+1's neurons from layer's FFN input) gets
layer+1's reads started while layer computes.
Unless the source says its `ahead` is final (`ahead_exact`), layer+1 then asks the source
itself and reads what the guess missed before computing (`lookahead=True` or "layer" wraps any
source in sparsity.NextLayerGuess: the layer+1 rule applied to layer's input). A guess is
recorded as wanted by the token before (NeuronCache.begin_guess), so its wrong neurons yield
to the true set for capacity and leave with the window; with compute="wanted" the result does not depend
on the guess, with "live" its rows are computed like any window-kept row.
lookahead="attention": the transformer calls `early(layer, ffn_norm(h))` with the residual h
entering the layer, before its attention; the source's `early` (or sparsity.SameLayerGuess: its
own rule on that input) guesses the layer's set, whose reads then overlap the attention, and
the FFN checks the guess as above.

A sticky source (`sticky = True`, `select(layer, x, cached)`: predictors with a stay recall)
names the set knowing which neurons the layer's cache holds: hysteresis, so a cached neuron
stays while its score clears a lower bar and only new neurons must clear the higher one.
It sees the cache as it was before a lookahead guess was admitted; but a wrong guess kept by the
window (or one that took a slot) changes later tokens' caches, so with a sticky source the
result of lookahead can differ from that of no lookahead, unlike with a plain source.

OPT's fc1 bias is resident (Store.up_biases, store order), not in the bundles: each row's bias is
gathered by the row's store position, from the cache's row -> position map for cache rows and
from the overflow ids for scratch rows.

By default (compute="live") the FFN runs on every live row, which is the wanted set plus neurons
kept by the window: for ReLU models the extra rows are exactly what dense would compute for them
(and catch the predictor's misses that happen to be cached); for SwiGLU models they make the
result closer to dense, at no I/O cost. compute="wanted" runs on this token's wanted rows only
(picked in place from the live block by the native kernel for float16 decode; gathered
otherwise): the sparse product the predictor
names, at less than half the memory traffic when the window keeps twice the wanted set (the
paper's OPT regime). With every neuron wanted, flash equals dense either way.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..budget import CachePlan, parse_memory, plan_caches
from ..errors import InvalidArgumentError, check_int
from ..io import AlignedBuf, NeuronCache, Reader, as_tensor
from ..sparsity import NextLayerGuess, SameLayerGuess, WantedSource, make_source
from ..store import PREDICTORS, RESIDENT, Store
from .base import rows_ffn

MAX_WINDOW = (1 << 32) - 1  # the native cache counts the window in 32 bits
SCRATCH_NEURONS = 1024    # overflow chunk: rows streamed at a time when a layer's cache is full
URING_DEPTH = 128         # reads in flight on the default io_uring engine (vda's queue holds 256)
POOL_THREADS = 32         # reads in flight with the pread pool ("auto", "threads")


def model_bytes(store: Store) -> tuple[int, int]:
    """(resident bytes, FFN payload bytes) of a store: what 1.0x of the memory budget means. The
    resident part includes the per-bundle CRC-32 tables (4 B a neuron) that the caches hold."""
    resident = (store.path / RESIDENT).stat().st_size
    if store.has_bundle_crcs:
        resident += 4 * sum(L.n_neurons for L in store.layers)
    return resident, sum(L.payload_bytes for L in store.layers)


def _mgmt_ns(cache: NeuronCache) -> int:
    """The cache's memory management so far (ns), without the CRC checks of bundles read: those
    belong to reading (the paper's breakdown: I/O, memory management, compute)."""
    st = cache.stats()
    return st["mgmt_ns"] - st.get("crc_ns", 0)


def check_window(window: Any) -> int:
    """The window as an int in [0, MAX_WINDOW] (0: keep nothing past the token), else InvalidArgumentError."""
    return check_int("window (tokens a neuron stays cached after it was last wanted)", window, 0, MAX_WINDOW)


class FlashFFN:
    name = "flash"

    def __init__(self, store: Store, memory: str | int | float | None = None, window: int = 4,
                 sparsity: str | WantedSource | None = None, profile: Any = None, concurrency: int | None = None,
                 overlap: bool = True, coalesce: bool = True, reuse: bool = True, engine: str | None = None,
                 compute: str = "live", lookahead: bool | str = False, hot: float = 0.0,
                 fill_holes: bool = True):
        from ..io import load_profile

        self.store, self.config = store, store.config
        if compute not in ("live", "wanted"):
            raise InvalidArgumentError(f"compute must be 'live' or 'wanted', not {compute!r}")
        window = check_window(window)
        if concurrency is not None:
            check_int("concurrency", concurrency, 1, 1 << 16)
        if engine not in (None, "auto", "threads", "io_uring"):
            raise InvalidArgumentError(f"engine must be 'auto', 'threads' or 'io_uring', not {engine!r}")
        self.compute = compute
        if sparsity is None:
            # The calibrated predictors when the store has them; else the oracle (an upper bound
            # that holds the full FFN outside the budget: `llmflash calibrate` to deploy).
            sparsity = "predictor" if (store.path / PREDICTORS).is_file() else "oracle"
            if sparsity == "oracle":
                warnings.warn(f"{store.path}: no predictors (run `llmflash calibrate`); using the oracle, "
                              "which keeps the full FFN in DRAM outside the memory budget", stacklevel=3)
        self.source = make_source(sparsity, store, hot=hot)
        mode = ("layer" if lookahead else None) if isinstance(lookahead, bool) else lookahead
        if mode not in (None, "layer", "attention"):
            raise InvalidArgumentError(f"lookahead must be False, True, 'layer' or 'attention', not {lookahead!r}")
        if mode == "layer" and not hasattr(self.source, "ahead"):
            self.source = NextLayerGuess(self.source)
        if mode == "attention" and not self.config.pre_norm:
            raise InvalidArgumentError(f"{store.path}: lookahead='attention' needs a pre-norm model (the guess "
                                       "reads the FFN norm of the attention input); use lookahead='layer'")
        if mode == "attention" and not hasattr(self.source, "early"):
            self.source = SameLayerGuess(self.source)
        self._sticky = bool(getattr(self.source, "sticky", False))
        resident, ffn = model_bytes(store)
        self.model_bytes = resident + ffn
        budget = parse_memory(memory, self.model_bytes) if memory is not None else self.model_bytes
        # The predictors stay in DRAM too: inside the budget (the oracle is a measurement aid
        # outside it, as documented).
        resident += int(getattr(self.source, "nbytes", lambda: 0)())
        bb = store.layers[0].bundle_bytes
        self.position: list[np.ndarray | None] = []     # original neuron id -> store position
        for L in store.layers:
            if L.order is None:
                self.position.append(None)
            else:
                pos = np.empty(L.n_neurons, dtype=np.int64)
                pos[np.asarray(L.order)] = np.arange(L.n_neurons)
                self.position.append(pos)
        self.b1: list[Tensor | None] = store.up_biases()
        self._pin_hot(store, getattr(self.source, "hot", None))
        resident += sum(t.numel() * t.element_size() for t in (*self.hot_rows, *self.hot_bias) if t is not None)
        cold = [L.n_neurons - (0 if h is None else len(h)) for L, h in zip(store.layers, self.hot_rows)]
        self.plan: CachePlan = plan_caches(budget, resident, cold, bb, scratch_neurons=0, store_name=str(store.path))
        if not reuse:
            # No DRAM cache: every wanted neuron streams through the scratch area every token
            # (the paper's "predictor only" row: nothing is kept from one token to the next).
            self.plan = dataclasses.replace(self.plan, capacities=(0,) * len(store.layers))
        if any(c < n for c, n in zip(self.plan.capacities, cold)):
            # Some layer can overflow: reserve the shared scratch area inside the budget.
            caps = self.plan.capacities
            self.plan = plan_caches(budget, resident, cold, bb, scratch_neurons=min(SCRATCH_NEURONS, max(cold)),
                                    store_name=str(store.path))
            if not reuse:
                self.plan = dataclasses.replace(self.plan, capacities=caps)
        # OPT's fc1 biases (self.b1), float32 (n,) per layer in store order: 4 B a neuron (2 MB
        # for OPT-6.7B), counted in the budget at the resident file's store-dtype size.
        self.profile = profile if profile is not None else load_profile()
        # engine: "auto" (io_uring for small batches, the pread pool for large), "threads" or
        # "io_uring" (one ring per fill, reaped by the filling thread). Default: io_uring with
        # URING_DEPTH reads in flight (a layer's ~390 reads at OPT-6.7B's scale go out in a few
        # submissions and the filling thread sleeps until they are done, leaving the cores to
        # the compute that overlaps them): paper bench 671 vs 707 and 772 vs 793 ms/token
        # (medians) against the pread pool at 32, which a 32-deep io_uring did not beat (900 vs
        # 968); with lookahead 657 vs 750. "auto" where the kernel refuses io_uring.
        # Lookahead: a source with `ahead(layer, x)` names layer+1's neurons from layer's FFN
        # input, so layer+1's reads start while layer computes (the disk never waits for
        # compute between layers).
        self._peek = getattr(self.source, "ahead", None) if overlap and mode != "attention" else None
        self._verify = self._peek is not None and not getattr(self.source, "ahead_exact", False)
        self._guess_early = getattr(self.source, "early", None) if overlap and mode == "attention" else None
        if self._guess_early is not None:
            self.early = self._early       # the transformer looks for this hook (models.transformer)
            self._verify = True
        if engine is None:
            try:
                self.reader = Reader(store.ffn_path, concurrency=concurrency or URING_DEPTH, engine="io_uring")
            except (OSError, ValueError, RuntimeError):    # no io_uring here (seccomp, old kernel)
                self.reader = Reader(store.ffn_path, concurrency=concurrency or POOL_THREADS)
        else:
            self.reader = Reader(store.ffn_path, concurrency=concurrency or POOL_THREADS, engine=engine)
        self.window = window
        self.overlap = overlap      # False: read, then compute (to measure what the overlap gains)
        # False: read only the wanted bundles' pages (neighbours still share a request), never
        # bridge a gap or take the whole region (the bench's "no coalescing" ablation)
        self.coalesce = coalesce
        self.caches: list[NeuronCache] = []
        self.rows: list[Tensor] = []                  # (capacity, bundle_values) views of each cache
        for L, cap in zip(store.layers, self.plan.capacities):
            cache = NeuronCache(self.reader, L.offset, L.n_neurons, L.bundle_bytes, cap, window,
                                profile=self.profile, allow_whole=coalesce, max_gap_bytes=None if coalesce else 0)
            crcs = store.bundle_crcs(L.index)
            if crcs is not None:            # every bundle read is checked as it lands (a StoreError)
                cache.set_bundle_crcs(crcs)
            self.caches.append(cache)
            self.rows.append(self._view(cache.slots, cap))
        scratch_rows = self.plan.scratch // bb
        self.scratch = AlignedBuf(max(1, scratch_rows) * bb)
        self.scratch_rows = self._view(self.scratch, scratch_rows)
        self.step = 0
        self.t = {"io": 0.0, "compute": 0.0, "predict": 0.0}
        # lookahead: neurons read ahead, wanted neurons the guess missed (read at the layer), and
        # for checked guesses the sizes of guess, wanted set and their overlap
        self.ahead = {"ahead_read": 0, "ahead_missed": 0, "guess_named": 0, "guess_right": 0, "wanted_named": 0,
                      "guess_hits": 0, "guess_overflow": 0, "guess_admissions": 0}
        # (step, Admission, wanted, live mask before it or None) per layer, started early (lookahead)
        self._ahead: list[tuple[int, Any, np.ndarray, Tensor | None] | None] = [None] * len(self.caches)
        # New neurons take the rows evictions emptied (no move: rust/cache.rs, set_fill_holes);
        # the compute that overlaps the reads takes every row but the admission's filled_rows.
        # False: the paper's scheme (each hole closed by moving the last live row in, new
        # neurons appended), whose moves run before the reads start (~1 ms a layer at OPT-6.7B's
        # scale).
        for cache in self.caches:
            cache.fill_holes = fill_holes

    def _pin_hot(self, store: Store, hot: list[Tensor] | None) -> None:
        """Read the hot neurons' bundles (source.hot: original ids per layer) into resident rows,
        computed every token and never named to the caches (hot pinning, llmflash.predictor)."""
        self.hot_rows: list[Tensor | None] = [None] * len(store.layers)
        self.hot_bias: list[Tensor | None] = [None] * len(store.layers)
        for i, ids in enumerate(hot or []):
            if len(ids) == 0:
                continue
            pos = np.sort(self._wanted(i, ids).astype(np.int64))
            self.hot_rows[i] = store.read_bundles(i, pos)
            b1 = self.b1[i]
            self.hot_bias[i] = None if b1 is None else b1[torch.from_numpy(pos)]

    def _view(self, buf: AlignedBuf, rows: int) -> Tensor:
        n = rows * self.config.bundle_values
        return as_tensor(buf, self.store.dtype)[:n].view(rows, self.config.bundle_values)

    def _ffn_rows(self, x: Tensor, rows: Tensor, bias: Tensor | None, pick: np.ndarray | None = None) -> Tensor:
        """The FFN over bundle rows (n, bundle_values) with their fc1 biases (n,) (OPT) or None;
        only the `pick` rows if given."""
        return rows_ffn(x, rows, self.config, bias, pick=pick)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D): the FFN over the layer's live neurons and this token's wanted set."""
        if layer == 0:
            self.step += 1
        t0 = time.perf_counter()
        cache, rows = self.caches[layer], self.rows[layer]
        mgmt0 = _mgmt_ns(cache)
        pre, self._ahead[layer] = self._ahead[layer], None
        if pre is not None and pre[0] == self.step:     # started by the layer before (lookahead)
            adm, wanted, t1 = pre[1], pre[2], t0
            self.ahead["ahead_read"] += adm.misses
            if self._verify:                            # a guess: the layer's own set decides
                guess, wanted = wanted, self._name(layer, x, pre[3])
                self.ahead["guess_named"] += len(guess)
                self.ahead["guess_right"] += len(np.intersect1d(guess, wanted))
                self.ahead["wanted_named"] += len(wanted)
                # the guess's admission is not this step's: its hits, overflow (named, not read)
                # and admission are not counted twice (its reads stay counted as misses)
                self.ahead["guess_hits"] += adm.hits
                self.ahead["guess_overflow"] += len(adm.overflow)
                self.ahead["guess_admissions"] += 1
                t1 = time.perf_counter()
                adm = cache.begin(wanted, self.step)    # settles the guess's reads; reads its misses
                self.ahead["ahead_missed"] += adm.misses
        else:
            wanted = self._name(layer, x)
            t1 = time.perf_counter()
            # evict + plan + start the reads in the background (GIL released); or read inline
            adm = cache.begin(wanted, self.step) if self.overlap else cache.admit(wanted, self.step)
        ahead_begin = ahead_mgmt = 0.0              # the next layer's begin: I/O issue + management
        if self._peek is not None and layer + 1 < len(self.caches):
            t6 = time.perf_counter()
            nxt = self._peek(layer, x)
            if nxt is not None:
                t7 = time.perf_counter()
                c2 = self.caches[layer + 1]
                m2 = _mgmt_ns(c2)
                w2 = self._wanted(layer + 1, nxt)
                live = self._live(layer + 1) if self._sticky and self._verify else None
                self._ahead[layer + 1] = (self.step, self._begin_ahead(c2, w2, self.step), w2, live)
                ahead_begin = time.perf_counter() - t7
                ahead_mgmt = (_mgmt_ns(c2) - m2) / 1e9
                t1 += t7 - t6                               # prediction time, not I/O
        x = x.to(rows.dtype)
        y = torch.zeros(x.shape[0], self.config.dim, dtype=torch.float32)
        t2 = time.perf_counter()
        # OPT: the rows' fc1 biases, by store position. begin has set the row -> position map
        # for rows [0, total_rows) (reads may be pending); an index into a (n,) vector.
        b1 = self.b1[layer]
        bias = None if b1 is None else b1[torch.from_numpy(cache.slot_neurons())]
        # Rows [0, n) are live; adm.filled_rows are being read (appended after the live block,
        # or in the holes evictions left). The sum runs in these two parts whether or not the
        # reads are done by now: a split that depended on timing would change the float
        # summation order from run to run, and a discontinuous selection (top-k, thresholds)
        # turns such last-bit differences into different neurons and visibly different logits
        # (seen: 0.7 on SmolLM2's logits after 40 tokens).
        n = adm.total_rows
        filling = np.zeros(n, dtype=bool)
        filling[adm.filled_rows] = True
        if self.compute == "wanted":
            # the live rows (sorted) holding this token's wanted neurons; those that overflowed
            # the cache are not live and run from the scratch area below
            pick = cache.rows_of(wanted)
            pick = np.sort(pick[(pick >= 0) & (pick < n)])
            pick = pick[np.diff(pick, prepend=-1) != 0]      # a duplicated id counts once (rows are >= 0)
        else:
            pick = np.arange(n)
        new = filling[pick]
        if self.hot_rows[layer] is not None:          # hot pinning: resident, always computed
            y += self._ffn_rows(x, self.hot_rows[layer], self.hot_bias[layer])
        y += self._some_rows(x, rows, bias, pick[~new])   # overlap: compute on hits while reads run
        t3 = time.perf_counter()
        cache.wait()
        t4 = time.perf_counter()
        y += self._some_rows(x, rows, bias, pick[new])
        t5 = time.perf_counter()
        io, compute = (t2 - t1) - ahead_begin + (t4 - t3), (t3 - t2) + (t5 - t4)
        overflow = np.asarray(adm.overflow, dtype=np.uint32)
        for start in range(0, len(overflow), self.scratch_rows.shape[0] or 1):
            chunk = overflow[start:start + self.scratch_rows.shape[0]]
            t6 = time.perf_counter()
            k = cache.read_neurons(chunk, self.scratch)               # row i = chunk[i]
            t7 = time.perf_counter()
            b = None if b1 is None else b1[torch.from_numpy(chunk[:k].astype(np.int64))]
            y += self._ffn_rows(x, self.scratch_rows[:k], b)
            io, compute = io + (t7 - t6), compute + (time.perf_counter() - t7)
        # Time blocked on the cache (begin, wait, overflow reads) is I/O except the memory
        # management done meanwhile (eviction, staging -> slot copies), which stats() reports
        # on its own; management that ran while compute did is not subtracted twice.
        mgmt = (_mgmt_ns(cache) - mgmt0) / 1e9
        self.t["predict"] += t1 - t0
        self.t["io"] += max(0.0, io - mgmt) + max(0.0, ahead_begin - ahead_mgmt)
        self.t["compute"] += compute
        return y

    def _early(self, layer: int, x: Tensor) -> None:
        """Before the layer's attention: guess its set from ffn_norm(residual) and start the reads
        (lookahead="attention"); the FFN call checks the guess. Layer 0 comes before the FFN call
        that advances the step, so its guess is for the next step."""
        step = self.step + 1 if layer == 0 else self.step
        t0 = time.perf_counter()
        ids = self._guess_early(layer, x)
        if ids is None:
            return
        guess = self._wanted(layer, ids)
        t1 = time.perf_counter()
        cache = self.caches[layer]
        m0 = _mgmt_ns(cache)
        live = self._live(layer) if self._sticky else None
        self._ahead[layer] = (step, self._begin_ahead(cache, guess, step), guess, live)
        t2 = time.perf_counter()
        self.t["predict"] += t1 - t0
        self.t["io"] += max(0.0, (t2 - t1) - (_mgmt_ns(cache) - m0) / 1e9)

    def _begin_ahead(self, cache: NeuronCache, ids: np.ndarray, step: int) -> Any:
        """A lookahead admission: a final set (`ahead_exact`) as wanted at `step`; a guess with
        `begin_guess`, which may evict the token before's neurons to make room but records its
        own as the token before's, so the check at the layer (at `step`) may evict its wrong
        neurons for capacity and the window ages them like any other (admitted as wanted now,
        they were protected and pushed the true set to overflow)."""
        return cache.begin_guess(ids, step) if self._verify else cache.begin(ids, step)

    def _some_rows(self, x: Tensor, rows: Tensor, bias: Tensor | None, sel: np.ndarray) -> Tensor | float:
        """The FFN over the live rows `sel` (sorted): a slice when they are one run of rows, else
        picked in place (native float16 decode) or gathered."""
        if len(sel) == 0:
            return 0.0
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        if hi - lo == len(sel):
            return self._ffn_rows(x, rows[lo:hi], None if bias is None else bias[lo:hi])
        return self._ffn_rows(x, rows[:hi], None if bias is None else bias[:hi], pick=sel.astype(np.uint32))

    def _name(self, layer: int, x: Tensor, live: Tensor | None = None) -> np.ndarray:
        """This token's wanted set (store positions) from the source; a sticky source
        (`select`, e.g. predictors with a stay recall) also sees which neurons the cache holds,
        as an (n,) bool over original ids: `live`, taken before a lookahead guess was admitted
        (so the set, and with compute="wanted" the result, does not depend on the guess), or
        the cache's live rows now."""
        if not self._sticky:
            return self._wanted(layer, self.source(layer, x))
        return self._wanted(layer, self.source.select(layer, x, self._live(layer) if live is None else live))

    def _live(self, layer: int) -> Tensor:
        """(n,) bool over original neuron ids: live in the layer's cache."""
        live = np.zeros(self.store.layers[layer].n_neurons, dtype=bool)
        live[self.caches[layer].slot_neurons()] = True
        pos = self.position[layer]
        return torch.from_numpy(live if pos is None else live[pos])

    def _wanted(self, layer: int, ids: Any) -> np.ndarray:
        """Original neuron ids -> store positions (uint32), as the cache takes them."""
        ids = ids.numpy() if isinstance(ids, Tensor) else np.asarray(ids)
        pos = self.position[layer]
        return (pos[ids] if pos is not None else ids).astype(np.uint32, copy=False)

    def stats(self) -> dict[str, float]:
        """Summed over layers: the cache counters, plus seconds in prediction, I/O (waiting for
        reads, including what overlapped none), memory management and compute."""
        out: dict[str, float] = {}
        for c in self.caches:
            for k, v in c.stats().items():
                out[k] = out.get(k, 0.0) + float(v)
        # a checked guess's own admission: one admission per layer and token is reported, and
        # hits are the check's (which include wanted neurons the guess had just read)
        out["hits"] = out.get("hits", 0.0) - self.ahead["guess_hits"]
        out["admissions"] = out.get("admissions", 0.0) - self.ahead["guess_admissions"]
        out["overflow"] = out.get("overflow", 0.0) - self.ahead["guess_overflow"]
        # eviction, index updates, staging -> slot copies (the CRC checks of bundles read are part
        # of reading them: in I/O when the token waits for them, reported on their own as crc_s)
        mgmt = (out.get("mgmt_ns", 0.0) - out.get("crc_ns", 0.0)) / 1e9
        out.update({"ffn_io_s": self.t["io"], "ffn_compute_s": self.t["compute"],
                    "predict_s": self.t["predict"], "mgmt_s": mgmt, "crc_s": out.get("crc_ns", 0.0) / 1e9,
                    "cache_capacity_neurons": float(sum(self.plan.capacities)),
                    "hot_neurons": float(sum(len(h) for h in self.hot_rows if h is not None)),
                    **{k: float(v) for k, v in self.ahead.items()},
                    "budget_bytes": float(self.plan.budget), "steps": float(self.step)})
        return out

    def reset_stats(self) -> None:
        for c in self.caches:
            c.reset_stats()
        self.t = dict.fromkeys(self.t, 0.0)
        self.ahead = dict.fromkeys(self.ahead, 0)
