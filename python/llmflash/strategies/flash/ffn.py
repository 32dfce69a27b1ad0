"""FlashFFN: one layer's FFN for one token (or prompt) as the paper's steps, with the lookahead
that starts a layer's reads before its FFN call."""

from __future__ import annotations

import time
from concurrent import futures
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ...device import synchronize
from ...io import Admission, NeuronCache
from ...sparsity import WantedSource
from ...store import Store
from ..base import rows_ffn
from .device_rows import Uploader, apply_moves, land
from .layer import FlashLayer
from .options import FlashOptions
from .overflow import overflow_worker
from .setup import build, bundle_view

UPLOAD_BYTES = 8 << 20  # on a GPU: each of the two page-locked chunks rows go up through


def _mgmt_ns(cache: NeuronCache) -> int:
    """The cache's memory management so far (ns), without the CRC checks of bundles read: those
    belong to reading (the paper's breakdown: I/O, memory management, compute)."""
    st = cache.stats()
    return st["mgmt_ns"] - st.get("crc_ns", 0)


class Laps:
    """The seconds of one FFN call by part: each lap charges the time since the one before to
    "predict", "io" or "compute". Time blocked on the cache (begin, wait, overflow reads) is I/O
    except the memory management it did meanwhile (eviction, staging -> slot copies), which
    stats() reports on its own; management that ran while compute did is not subtracted twice."""

    def __init__(self, cache: NeuronCache):
        self.cache, self.mgmt0 = cache, _mgmt_ns(cache)
        self.seconds = {"predict": 0.0, "io": 0.0, "compute": 0.0}
        self.last = time.perf_counter()

    def lap(self, part: str | None) -> None:
        """Charge the time since the last lap to `part` (None: to nothing, as another Laps did)."""
        now = time.perf_counter()
        if part is not None:
            self.seconds[part] += now - self.last
        self.last = now

    def add_to(self, totals: dict[str, float]) -> None:
        """Add the call's seconds to `totals`, the cache's management taken out of its I/O."""
        mgmt = (_mgmt_ns(self.cache) - self.mgmt0) / 1e9
        totals["predict"] += self.seconds["predict"]
        totals["io"] += max(0.0, self.seconds["io"] - mgmt)
        totals["compute"] += self.seconds["compute"]


class Pending(NamedTuple):
    """An admission lookahead started for a layer before its FFN call."""

    step: int  # the token it is for
    adm: Admission
    wanted: np.ndarray  # the set admitted (store positions): final, or a guess to check
    live: Tensor | None  # for a sticky source that checks a guess: the live mask before it


class FlashFFN:
    """The flash strategy (the package docstring says how it works). Per layer, `layers[i]` holds
    the cache, the id -> position map, the fc1 biases and the hot rows."""

    name = "flash"

    def __init__(
        self,
        store: Store,
        memory: str | int | float | None = None,
        window: int = 4,
        sparsity: str | WantedSource | None = None,
        profile: Any = None,
        concurrency: int | None = None,
        overlap: bool = True,
        coalesce: bool = True,
        reuse: bool = True,
        engine: str | None = None,
        compute: str = "live",
        lookahead: bool | str = False,
        hot: float = 0.0,
        fill_holes: bool = True,
        device: torch.device | None = None,
    ):
        self.store, self.config = store, store.config
        self.quant = store.quant  # quantized stores: the block format of the uint8 bundle rows
        self.options = FlashOptions(
            memory=memory,
            window=window,
            sparsity=sparsity,
            profile=profile,
            concurrency=concurrency,
            overlap=overlap,
            coalesce=coalesce,
            reuse=reuse,
            engine=engine,
            compute=compute,
            lookahead=lookahead,
            hot=hot,
            fill_holes=fill_holes,
            device=device,
        )
        s = build(store, self.options)
        self.source, self.layers, self.plan, self.model_bytes = s.source, s.layers, s.plan, s.model_bytes
        self.profile, self.reader, self.scratch, self.scratch_rows = s.profile, s.reader, s.scratch, s.scratch_rows
        # on a GPU (device_rows.py): the overflow scratch there, and rows moved / sent up so far
        self.scratch_device = s.scratch_device
        self.device = None if s.scratch_device is None else s.scratch_device.device
        self.device_rows = {"moved": 0, "landed": 0, "overflow_up": 0}
        self.uploader = None
        if self.device is not None:  # host rows go up through UPLOAD_BYTES page-locked chunks
            bb = store.layers[0].bundle_bytes
            self.uploader = Uploader(self.device, self.config.bundle_values, store.dtype, UPLOAD_BYTES // bb)
        self._sticky = bool(getattr(self.source, "sticky", False))
        self._hook_lookahead()
        self.step = 0
        self.t = {"io": 0.0, "compute": 0.0, "predict": 0.0}
        # lookahead: neurons read ahead, wanted neurons the guess missed (read at the layer), and
        # for checked guesses the sizes of guess, wanted set and their overlap
        self.ahead = {
            "ahead_read": 0,
            "ahead_missed": 0,
            "guess_named": 0,
            "guess_right": 0,
            "wanted_named": 0,
            "guess_hits": 0,
            "guess_overflow": 0,
            "guess_admissions": 0,
        }
        self._ahead: list[Pending | None] = [None] * len(self.layers)  # started early, per layer

    def _hook_lookahead(self) -> None:
        """lookahead "layer": the source's `ahead(layer, x)` names layer+1's neurons from layer's
        FFN input, so layer+1's reads start while layer computes (the disk never waits for compute
        between layers). "attention": `early` is the hook the transformer calls before a layer's
        attention. A guess (not `ahead_exact`) is checked at its layer. Overlap off: neither."""
        mode, overlap = self.options.lookahead, self.options.overlap
        self._peek = getattr(self.source, "ahead", None) if overlap and mode != "attention" else None
        self._verify = self._peek is not None and not getattr(self.source, "ahead_exact", False)
        self._guess_early = getattr(self.source, "early", None) if overlap and mode == "attention" else None
        if self._guess_early is not None:
            self.early = self._early  # the transformer looks for this hook (models.transformer)
            self._verify = True

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        """x (T, D) -> (T, D): the FFN over the layer's live neurons and this token's wanted set."""
        if layer == 0:
            self.step += 1
        lay = self.layers[layer]
        laps = Laps(lay.cache)
        wanted, adm = self._admit(layer, x, laps)  # name the wanted neurons, begin their reads
        overflow = np.asarray(adm.overflow, dtype=np.uint32)  # the wanted neurons the cache cannot hold
        early = self._overflow_early(lay, overflow)  # their first chunk read beside the fill
        try:
            if self._peek is not None and layer + 1 < len(self.layers):
                self._read_ahead(layer, x, laps)  # and layer+1's
            x = x.to(lay.rows.dtype) if lay.rows.dtype.is_floating_point else x.float()  # quantized: float32
            y = torch.zeros(x.shape[0], self.config.dim, dtype=torch.float32, device=x.device)
            bias = lay.row_bias()
            ready, filling = lay.rows_to_compute(adm, wanted if self.options.compute == "wanted" else None)
            if lay.hot_rows is not None:  # hot pinning: resident, always computed
                y += rows_ffn(x, lay.hot_rows, self.config, lay.hot_bias, q=lay.q)
            y += self._some_rows(x, lay, bias, ready)  # the cached rows, while the reads run
            laps.lap("compute")
            lay.cache.wait()
            self._landed(lay, adm)  # on a GPU: the fill's bundles up into their rows
            laps.lap("io")
            y += self._some_rows(x, lay, bias, filling)  # the rows just read
            laps.lap("compute")
            self._overflow(lay, x, y, overflow, laps, early)
            if self.device is not None:  # the GPU's work counted where it ran
                synchronize(self.device)
                laps.lap("compute")
        finally:
            if early is not None:  # never leave a read writing into the scratch area
                futures.wait([early])
        laps.add_to(self.t)
        return y

    def _host_rows(self, buf: Any, k: int) -> Tensor:
        """The first k bundles of a host buffer (a fill's landed bundles) as rows."""
        return bundle_view(self.store, buf, k)

    def _overflow_early(self, lay: FlashLayer, ids: np.ndarray) -> futures.Future[int] | None:
        """Start reading the first scratch chunk of the overflow `ids` on the overflow worker, so it
        runs beside the fill and the compute on cached and hot rows (None: nothing to read, or
        overlap off: flash-serial reads it after the compute, as the paper's baseline does)."""
        if not len(ids) or not self.options.overlap or lay.overflow is None:
            return None
        chunk = ids[: self.scratch_rows.shape[0]]
        return overflow_worker().submit(lay.overflow.read, chunk, self.scratch)

    def _admit(self, layer: int, x: Tensor, laps: Laps) -> tuple[np.ndarray, Admission]:
        """This token's wanted set (store positions) and the cache's admission of it: evict, plan
        and start the reads in the background (GIL released), or read inline with overlap off.
        An admission lookahead started for this token is taken as is when final, else checked."""
        lay = self.layers[layer]
        pre, self._ahead[layer] = self._ahead[layer], None
        if pre is not None and pre.step != self.step and self.device is not None:
            lay.cache.wait()  # a stale lookahead's fill still goes up: its neurons stay cached
            self._landed(lay, pre.adm)
        if pre is not None and pre.step == self.step:
            self.ahead["ahead_read"] += pre.adm.misses
            if self._verify:
                return self._check_guess(layer, x, pre, laps)
            laps.lap("io")
            return pre.wanted, pre.adm
        wanted = self._name(layer, x)
        laps.lap("predict")
        adm = lay.cache.begin(wanted, self.step) if self.options.overlap else lay.cache.admit(wanted, self.step)
        laps.lap("io")
        return wanted, self._moved(lay, adm)

    def _moved(self, lay: FlashLayer, adm: Admission) -> Admission:
        """On a GPU: the admission's eviction moves applied to the layer's device rows at once (they
        are done in the index already; no compute uses the rows before the next admission)."""
        if self.device is not None:
            self.device_rows["moved"] += apply_moves(lay.rows, adm)
        return adm

    def _landed(self, lay: FlashLayer, adm: Admission) -> None:
        """On a GPU, after the wait: the admission's fill up into its device rows."""
        if self.uploader is not None:
            self.device_rows["landed"] += land(self.uploader, lay.rows, lay.cache, adm, self._host_rows)

    def _check_guess(self, layer: int, x: Tensor, pre: Pending, laps: Laps) -> tuple[np.ndarray, Admission]:
        """The layer's own set decides over a guess started early: the cache admits it (which
        settles the guess's reads) and reads what the guess missed. The guess's admission is not
        this token's: its hits, overflow (named, not read) and admission are not counted twice (its
        reads stay counted as misses)."""
        wanted, a = self._name(layer, x, pre.live), self.ahead
        a["guess_named"] += len(pre.wanted)
        a["guess_right"] += len(np.intersect1d(pre.wanted, wanted))
        a["wanted_named"] += len(wanted)
        a["guess_hits"] += pre.adm.hits
        a["guess_overflow"] += len(pre.adm.overflow)
        a["guess_admissions"] += 1
        laps.lap("predict")
        lay = self.layers[layer]
        if self.device is not None:  # the guess's fill, which the check's begin settles, goes up first
            lay.cache.wait()
            self._landed(lay, pre.adm)
        adm = self._moved(lay, lay.cache.begin(wanted, self.step))
        a["ahead_missed"] += adm.misses
        laps.lap("io")
        return wanted, adm

    def _read_ahead(self, layer: int, x: Tensor, laps: Laps) -> None:
        """Lookahead "layer": start layer+1's reads from the source's `ahead` on layer's input."""
        ids = self._peek(layer, x.cpu())  # the sources run on the host
        laps.lap("predict")
        if ids is None:
            return
        nxt = self.layers[layer + 1]
        own = Laps(nxt.cache)  # layer+1's management is taken out of this I/O
        wanted = nxt.positions(ids)
        live = nxt.live_mask() if self._sticky and self._verify else None
        adm = self._moved(nxt, self._begin_ahead(nxt.cache, wanted, self.step))
        self._ahead[layer + 1] = Pending(self.step, adm, wanted, live)
        own.lap("io")
        own.add_to(self.t)
        laps.lap(None)

    def _early(self, layer: int, x: Tensor) -> None:
        """Before the layer's attention: guess its set from ffn_norm(residual) and start the reads
        (lookahead="attention"); the FFN call checks the guess. Layer 0 comes before the FFN call
        that advances the step, so its guess is for the next step."""
        step = self.step + 1 if layer == 0 else self.step
        lay = self.layers[layer]
        laps = Laps(lay.cache)
        ids = self._guess_early(layer, x.cpu())
        if ids is None:
            return
        guess = lay.positions(ids)
        laps.lap("predict")
        live = lay.live_mask() if self._sticky else None
        self._ahead[layer] = Pending(step, self._moved(lay, self._begin_ahead(lay.cache, guess, step)), guess, live)
        laps.lap("io")
        laps.add_to(self.t)

    def _begin_ahead(self, cache: NeuronCache, ids: np.ndarray, step: int) -> Admission:
        """A lookahead admission: a final set (`ahead_exact`) as wanted at `step`; a guess with
        `begin_guess`, which may evict the token before's neurons to make room but records its
        own as the token before's, so the check at the layer (at `step`) may evict its wrong
        neurons for capacity and the window ages them like any other (admitted as wanted now,
        they were protected and pushed the true set to overflow)."""
        return cache.begin_guess(ids, step) if self._verify else cache.begin(ids, step)

    def _overflow(
        self, lay: FlashLayer, x: Tensor, y: Tensor, ids: np.ndarray, laps: Laps, early: futures.Future[int] | None
    ) -> None:
        """Add to `y` the FFN of the wanted neurons that did not fit the cache (store positions),
        streamed through the scratch area a chunk at a time; the first chunk's read is `early`'s
        when it was started beside the fill (_overflow_early)."""
        size = self.scratch_rows.shape[0]
        for start in range(0, len(ids), size or 1):
            chunk = ids[start : start + size]
            if start == 0 and early is not None:
                k = early.result()  # its StoreError or FlashIOError, raised here
            else:
                k = lay.cache.read_neurons(chunk, self.scratch)  # row i = chunk[i]
            rows = self.scratch_rows[:k]
            if self.uploader is not None and self.scratch_device is not None:  # up to the GPU
                self.device_rows["overflow_up"] += self.uploader.upload(self.scratch_device, np.arange(k), rows)
                rows = self.scratch_device[:k]
            laps.lap("io")
            b = None if lay.bias is None else lay.bias[torch.from_numpy(chunk[:k].astype(np.int64)).to(lay.bias.device)]
            y += rows_ffn(x, rows, self.config, b, q=lay.q)
            laps.lap("compute")

    def _some_rows(self, x: Tensor, lay: FlashLayer, bias: Tensor | None, sel: np.ndarray) -> Tensor | float:
        """The FFN over `lay`'s cache rows `sel` (sorted): a slice when they are one run of rows,
        else picked in place (native decode) or gathered."""
        if len(sel) == 0:
            return 0.0
        rows = lay.rows
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        if hi - lo == len(sel):
            return rows_ffn(x, rows[lo:hi], self.config, None if bias is None else bias[lo:hi], q=lay.q)
        b = None if bias is None else bias[:hi]
        return rows_ffn(x, rows[:hi], self.config, b, pick=sel.astype(np.uint32), q=lay.q)

    def _name(self, layer: int, x: Tensor, live: Tensor | None = None) -> np.ndarray:
        """This token's wanted set (store positions) from the source; a sticky source
        (`select`, e.g. predictors with a stay recall) also sees which neurons the cache holds,
        as an (n,) bool over original ids: `live`, taken before a lookahead guess was admitted
        (so the set, and with compute="wanted" the result, does not depend on the guess), or
        the cache's live rows now."""
        lay = self.layers[layer]
        x = x.cpu()  # the sources run on the host (on a GPU: the layer's input comes down)
        if not self._sticky:
            return lay.positions(self.source(layer, x))
        return lay.positions(self.source.select(layer, x, lay.live_mask() if live is None else live))

    def stats(self) -> dict[str, float]:
        """Summed over layers: the cache counters, plus seconds in prediction, I/O (waiting for
        reads, including what overlapped none), memory management and compute, and the read
        requests per step with their mean size."""
        out: dict[str, float] = {}
        for c in (lay.cache for lay in self.layers):
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
        out.update(
            {
                "ffn_io_s": self.t["io"],
                "ffn_compute_s": self.t["compute"],
                "predict_s": self.t["predict"],
                "mgmt_s": mgmt,
                "crc_s": out.get("crc_ns", 0.0) / 1e9,
                "cache_capacity_neurons": float(sum(self.plan.capacities)),
                "hot_neurons": float(sum(len(lay.hot_rows) for lay in self.layers if lay.hot_rows is not None)),
                **{k: float(v) for k, v in self.ahead.items()},
                **self._device_stats(),
                "budget_bytes": float(self.plan.budget),
                "steps": float(self.step),
                # what neuron placement (`llmflash place`) changes: reads per forward step (a
                # decoded token; a prompt chunk counts once) and their mean size
                "requests_per_token": out.get("requests", 0.0) / max(self.step, 1),
                "bytes_per_request": out.get("bytes_read", 0.0) / max(out.get("requests", 0.0), 1.0),
            }
        )
        return out

    def _device_stats(self) -> dict[str, float]:
        """On a GPU: rows moved there, sent up (fills, overflow), and what the host holds for it
        (the read and overflow buffers, the page-locked upload chunks)."""
        if self.uploader is None:
            return {}
        out = {f"device_rows_{k}": float(v) for k, v in self.device_rows.items()}
        out["host_pinned_bytes"] = float(self.uploader.host_bytes)
        out["host_scratch_bytes"] = float(self.scratch.capacity)
        return out

    def reset_stats(self) -> None:
        for c in (lay.cache for lay in self.layers):
            c.reset_stats()
        self.t = dict.fromkeys(self.t, 0.0)
        self.ahead = dict.fromkeys(self.ahead, 0)
        self.device_rows = dict.fromkeys(self.device_rows, 0)
