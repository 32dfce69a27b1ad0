"""`flash` and `naive` on a mixture-of-experts store: the unit read and cached is an expert.

The router says exactly which experts a token needs (no predictor), and an expert is one
contiguous run of bundles in ffn.bin (models/config.py), so each layer gets a NeuronCache whose
"bundle" is a whole expert: a miss is one large read (neighbouring experts coalesce), the window
keeps the experts of the last `window` tokens, capacity evicts the least recently used, and each
read is CRC-checked against the experts' CRCs (combined from the per-neuron table, nothing read).
The budget (`memory`) is split as for neurons (budget.plan_caches): resident weights first,
then a scratch area of one token's top-k experts through which what the caches cannot hold
streams, then equal shares of every layer's experts.

Per layer and token: route (the resident router), begin the cache's reads of the missing
experts, compute the experts already there while they run, wait, compute the new ones, then
stream the overflow through the scratch area. `naive` is the same with no cache: every routed
expert read every token. Lookahead ("layer"): layer i+1's router applied to layer i's FFN input
guesses its experts, whose reads start at once (begin_guess: a wrong guess costs reads, never
correctness); "attention": each layer's own router on the FFN norm of its attention input
guesses, the reads running beside the attention. The guess's precision is counted.

A quantized store's experts are its bundles as they are (each carries its down group: the
layer's resident scales serve any subset). CPU only so far (a GPU is an InvalidArgumentError).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..budget import parse_memory, plan_caches
from ..device import on_cpu
from ..errors import InvalidArgumentError
from ..io import AlignedBuf, NeuronCache, combine_crcs, load_profile
from ..models.moe import expert_ids, route
from ..store import Store
from .base import rows_ffn
from .flash.options import FlashOptions
from .flash.setup import bundle_view, model_bytes, open_reader

# options of flash that name neuron-level machinery: an expert store has no use for them
NEURON_ONLY = {
    k: FlashOptions.__dataclass_fields__[k].default for k in ("sparsity", "hot", "compute", "fill_holes", "coalesce")
}


class ExpertFFN:
    """Expert caches over a mixture-of-experts store (module docstring). `name`: "flash", or
    "naive" (no cache: reuse=False, every routed expert read each token)."""

    def __init__(self, store: Store, name: str = "flash", device: torch.device | None = None, **options: Any):
        c = self.config = store.config
        self.store, self.name = store, name
        if not c.n_experts:
            raise InvalidArgumentError("not a mixture-of-experts store", store.path)
        if device is not None and not on_cpu(device):
            raise InvalidArgumentError(
                f"a mixture-of-experts store runs on the CPU only so far (device {device} asked): use --device cpu",
                store.path,
            )
        if name == "naive":  # naive's options, the expert reads always CRC-checked
            unknown = sorted(set(options) - {"concurrency", "engine", "verify_reads"})
            if unknown or options.pop("verify_reads", True) is not True:
                raise InvalidArgumentError(
                    "naive on a mixture-of-experts store takes concurrency and engine only, "
                    f"not {unknown or 'verify_reads=False'}",
                    store.path,
                )
            options["reuse"] = False
        for k, default in NEURON_ONLY.items():
            if options.get(k, default) != default:
                raise InvalidArgumentError(
                    f"{k}={options[k]!r}: a mixture-of-experts store reads whole experts (its router picks them)",
                    store.path,
                )
        self.options = o = FlashOptions(**options)
        if not o.overlap:  # reads then compute, nothing started early (as FlashFFN)
            o = self.options = FlashOptions(**{**options, "lookahead": False})
        if o.lookahead == "attention":
            if not c.pre_norm:
                raise InvalidArgumentError("lookahead='attention' needs a pre-norm model", store.path)
            self.early = self._early  # the transformer calls it before each layer's attention
        self.routers = store.routers()
        resident, ffn = model_bytes(store)
        budget = parse_memory(o.memory, resident + ffn) if o.memory is not None else resident + ffn
        F = [c.expert_dim(i) for i in range(c.n_layers)]
        bb = store.layers[0].bundle_bytes
        unit = max(F) * bb  # an expert's bytes (every layer's experts are as wide in Mixtral)
        k = c.experts_per_token
        self.plan = plan_caches(budget, resident, [c.n_experts] * c.n_layers, unit, k, str(store.path), o.reuse)
        self.reader = open_reader(store, o)
        profile = o.profile if o.profile is not None else load_profile()
        self.caches: list[NeuronCache] = []
        self.rows: list[Tensor] = []  # per layer: (capacity * F, bundle_values) view of the slot matrix
        for i, (L, cap) in enumerate(zip(store.layers, self.plan.capacities)):
            ub = F[i] * L.bundle_bytes
            cache = NeuronCache(self.reader, L.offset, c.n_experts, ub, cap, o.window, profile=profile)
            crcs = store.bundle_crcs(i)
            if crcs is not None:
                cache.set_bundle_crcs(combine_crcs(crcs, F[i], L.bundle_bytes))
            cache.fill_holes = True
            self.caches.append(cache)
            self.rows.append(bundle_view(store, cache.slots, cap * F[i]))
        self.F = F
        self.q = [store.q_bundles(i) for i in range(c.n_layers)]  # quantized: each layer's down scales
        self.scratch = AlignedBuf(max(1, self.plan.scratch))
        self.scratch_experts = self.plan.scratch // unit
        self.step = 0
        self.t = {"io": 0.0, "compute": 0.0, "predict": 0.0}
        # the guesses' own admissions are not tokens': their hits and overflow (named, never read)
        # are taken out of the caches' counts, as FlashFFN does
        self.ahead = dict.fromkeys(
            ("guess_named", "guess_right", "wanted_named", "guess_hits", "guess_overflow", "guess_admissions"), 0
        )
        self._guess: list[tuple[np.ndarray, Any] | None] = [None] * c.n_layers
        # the experts each layer's router picked since the last reset_stats: how concentrated the
        # routing is, which bounds what any cache can hit
        self.routed = np.zeros((c.n_layers, c.n_experts), dtype=bool)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D) float32: the routed experts' sum (models/moe.py)."""
        if layer == 0:
            self.step += 1
        t0 = time.perf_counter()
        cache, F = self.caches[layer], self.F[layer]
        experts, weights = route(x, self.routers[layer], self.config)
        ids = np.asarray(expert_ids(experts), dtype=np.uint32)
        self.routed[layer, ids] = True
        self._check_guess(layer, ids)
        t1 = time.perf_counter()
        adm = cache.begin(ids, self.step) if self.options.overlap else cache.admit(ids, self.step)
        if self.options.lookahead == "layer" and layer + 1 < self.config.n_layers:
            self._read_ahead(layer + 1, x)
        t2 = time.perf_counter()
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
        rows = cache.rows_of(ids)
        filled = set(np.asarray(adm.filled_rows).tolist())
        live = [(int(e), int(r)) for e, r in zip(ids, rows) if 0 <= r < adm.total_rows]
        for e, r in live:  # the experts already there, while the reads run
            if r not in filled:
                self._add(layer, y, x, experts, weights, e, self.rows[layer][r * F : (r + 1) * F])
        t3 = time.perf_counter()
        cache.wait()
        t4 = time.perf_counter()
        for e, r in live:
            if r in filled:
                self._add(layer, y, x, experts, weights, e, self.rows[layer][r * F : (r + 1) * F])
        io = self._overflow(layer, x, y, experts, weights, np.asarray(adm.overflow, dtype=np.uint32))
        t5 = time.perf_counter()
        self.t["predict"] += t1 - t0
        self.t["io"] += (t2 - t1) + (t4 - t3) + io
        self.t["compute"] += (t3 - t2) + (t5 - t4) - io
        return y

    def _add(self, layer: int, y: Tensor, x: Tensor, experts: Tensor, weights: Tensor, e: int, rows: Tensor) -> None:
        """y[t] += w_te * expert_e(x_t) for the tokens t routed to e, given its rows."""
        t, slot = torch.where(experts == e)
        y.index_add_(0, t, rows_ffn(x[t], rows, self.config, q=self.q[layer]).float() * weights[t, slot, None])

    def _overflow(self, layer: int, x: Tensor, y: Tensor, experts: Tensor, weights: Tensor, ids: np.ndarray) -> float:
        """The routed experts the cache could not hold, read through the scratch area a few at a
        time; the seconds spent reading."""
        F, io, step = self.F[layer], 0.0, max(1, self.scratch_experts)
        for a in range(0, len(ids), step):
            chunk = ids[a : a + step]
            t0 = time.perf_counter()
            self.caches[layer].read_neurons(chunk, self.scratch)
            io += time.perf_counter() - t0
            rows = bundle_view(self.store, self.scratch, len(chunk) * F)
            for k, e in enumerate(chunk.tolist()):
                self._add(layer, y, x, experts, weights, e, rows[k * F : (k + 1) * F])
        return io

    def _read_ahead(self, nxt: int, x: Tensor) -> None:
        """Lookahead: layer nxt's router on this layer's FFN input guesses its experts; their
        reads start now (begin_guess) and the guess is checked when nxt routes for real."""
        self._begin_guess(nxt, x, self.step)

    def _early(self, layer: int, x: Tensor) -> None:
        """Lookahead "attention": the layer's own router on the FFN norm of its attention input
        (the residual before attention adds to it) guesses its experts; their reads run beside the
        attention. Layer 0 comes before the call that advances the step: its guess is the next."""
        self._begin_guess(layer, x, self.step + 1 if layer == 0 else self.step)

    def _begin_guess(self, layer: int, x: Tensor, step: int) -> None:
        """Route x with the layer's router and start reading the experts it names."""
        guess = np.asarray(expert_ids(route(x, self.routers[layer], self.config)[0]), dtype=np.uint32)
        self._guess[layer] = (guess, self.caches[layer].begin_guess(guess, step))

    def _check_guess(self, layer: int, ids: np.ndarray) -> None:
        pending, self._guess[layer] = self._guess[layer], None
        if pending is not None:
            guess, adm = pending
            a = self.ahead
            a["guess_named"] += len(guess)
            a["guess_right"] += len(np.intersect1d(guess, ids))
            a["wanted_named"] += len(ids)
            a["guess_hits"] += adm.hits
            a["guess_overflow"] += len(adm.overflow)
            a["guess_admissions"] += 1

    def stats(self) -> dict[str, float]:
        """Summed over layers: the caches' counters (hits, misses, overflow count experts; bytes
        read against bytes_useful, the routed experts' own bytes), seconds in routing, I/O and
        compute, experts read per token and the lookahead guess's precision."""
        out: dict[str, float] = {}
        for c in self.caches:
            for k, v in c.stats().items():
                out[k] = out.get(k, 0.0) + float(v)
        a = self.ahead
        out["hits"] = out.get("hits", 0.0) - a["guess_hits"]
        out["overflow"] = out.get("overflow", 0.0) - a["guess_overflow"]
        out["admissions"] = out.get("admissions", 0.0) - a["guess_admissions"]
        steps = max(self.step, 1)
        read = out.get("misses", 0.0) + out.get("overflow", 0.0)
        out.update(
            {
                "ffn_io_s": self.t["io"],
                "ffn_compute_s": self.t["compute"],
                "predict_s": self.t["predict"],
                "mgmt_s": (out.get("mgmt_ns", 0.0) - out.get("crc_ns", 0.0)) / 1e9,
                "crc_s": out.get("crc_ns", 0.0) / 1e9,
                "experts_read_per_token": read / steps,
                "expert_hit_rate": out.get("hits", 0.0) / max(1.0, out.get("hits", 0.0) + read),
                "cache_capacity_experts": float(sum(self.plan.capacities)),
                "distinct_experts_per_layer": float(self.routed.sum()) / self.config.n_layers,
                "budget_bytes": float(self.plan.budget),
                "steps": float(self.step),
                "requests_per_token": out.get("requests", 0.0) / steps,
                "bytes_per_request": out.get("bytes_read", 0.0) / max(out.get("requests", 0.0), 1.0),
                **{k: float(v) for k, v in self.ahead.items()},
            }
        )
        return out

    def reset_stats(self) -> None:
        for c in self.caches:
            c.reset_stats()
        self.t = dict.fromkeys(self.t, 0.0)
        self.ahead = dict.fromkeys(self.ahead, 0)
        self.routed[:] = False
