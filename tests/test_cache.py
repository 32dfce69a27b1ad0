"""The per-layer NeuronCache through Python.

A hypothesis state machine drives caches of random capacity, window, bundle size and planner
options over a real file with random wanted sets, background and inline admissions, window
changes and overflow reads, and checks after every step, against a plain-Python model of the
rules: the live rows are one block [0, live) of distinct neurons whose bytes equal the file's;
index and row map agree; every wanted neuron is live or overflowed, and only when capacity forced
it; no neuron older than the window survives; nothing is evicted that the window or capacity did
not force (the model predicts the exact live set, ties included); bytes read per step are exactly
the pages of the appended bundles plus bridged gaps (an independent page model when the planner
is held to sparse plans, the plan itself otherwise).

Then: a background fill into layer A while torch computes on layer B's zero-copy rows, many
times, always equal to the file; the GIL released during a cache read; I/O errors (a truncated
file) leave no neuron presented as filled; zero-copy lifetime of the slot matrix.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import python_counter
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmflash import FlashIOError
from llmflash.io import AlignedBuf, NeuronCache, Profile, Reader, as_array, cache_rows, layer_cache, plan

PAGE = 4096
EMPTY, FILLING, READY = 0, 1, 2
BIG_WINDOW = 2**32 - 1


def align_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def write_store(path: Path, n: int, bb: int, offset: int, seed: int) -> np.ndarray:
    """A file holding random bytes, with a region of n bundles of bb bytes at `offset`."""
    data = np.random.default_rng(seed).integers(0, 256, offset + align_up(n * bb), dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


def bundle(data: np.ndarray, offset: int, bb: int, j: int) -> np.ndarray:
    return data[offset + j * bb : offset + (j + 1) * bb]


def sparse_bytes(ids: list[int], bb: int, gap_bytes: int) -> int:
    """Bytes a sparse plan reads: each bundle's pages, runs merged across gaps <= gap_bytes."""
    gap = gap_bytes // PAGE
    total, run = 0, None
    for j in sorted(set(ids)):
        a, b = j * bb // PAGE, -(-(j + 1) * bb // PAGE)
        if run is not None and a <= run[1] + gap:
            run[1] = max(run[1], b)
        else:
            if run is not None:
                total += run[1] - run[0]
            run = [a, b]
    if run is not None:
        total += run[1] - run[0]
    return total * PAGE


class Model:
    """The cache's rules on a dict neuron -> step last wanted (rust/cache.rs, module comment)."""

    def __init__(self, capacity: int, window: int):
        self.capacity, self.window = capacity, window
        self.live: dict[int, int] = {}

    def step(self, wanted: list[int], step: int):
        unique = list(dict.fromkeys(wanted))
        for j in unique:
            if j in self.live:
                self.live[j] = step
        n0 = len(self.live)
        self.live = {j: t for j, t in self.live.items() if max(0, step - t) <= self.window}
        ew = n0 - len(self.live)
        missing = [j for j in unique if j not in self.live]
        hits = len(unique) - len(missing)
        ec = 0
        if len(self.live) + len(missing) > self.capacity:
            need = len(self.live) + len(missing) - self.capacity
            cand = sorted((t, j) for j, t in self.live.items() if t < step)
            for _, j in cand[:need]:
                del self.live[j]
                ec += 1
        m = min(len(missing), self.capacity - len(self.live))
        for j in missing[:m]:
            self.live[j] = step
        return hits, missing[:m], missing[m:], ew, ec


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="llmflash-cache-", dir=os.environ.get("LLMFLASH_TEST_DIR")))

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    @initialize(
        n=st.integers(1, 160),
        bb=st.one_of(st.sampled_from([100, 3456, 4096, 8192, 16384]), st.integers(1, 9000)),
        cap_frac=st.floats(0, 1),
        window=st.one_of(st.integers(0, 4), st.just(BIG_WINDOW)),
        offset_pages=st.integers(0, 3),
        sparse_only=st.booleans(),
        gap_pages=st.integers(0, 4),
        concurrency=st.sampled_from([1, 4, 32]),
        seed=st.integers(0, 2**32 - 1),
        fill_holes=st.booleans(),
    )
    def setup(self, n, bb, cap_frac, window, offset_pages, sparse_only, gap_pages, concurrency, seed, fill_holes):
        self.n, self.bb, self.offset = n, bb, offset_pages * PAGE
        self.capacity = int(n * cap_frac)
        path = self.dir / "ffn.bin"
        self.data = write_store(path, n, bb, self.offset, seed)
        self.reader = Reader(path, concurrency=concurrency)
        self.options = dict(allow_whole=not sparse_only, max_gap_bytes=gap_pages * PAGE if sparse_only else None)
        self.profile = Profile.default()
        self.cache = NeuronCache(
            self.reader, self.offset, n, bb, self.capacity, window, profile=self.profile, **self.options
        )
        self.cache.fill_holes = fill_holes  # new neurons into evicted rows, or the paper's moves
        assert self.cache.fill_holes == fill_holes
        self.model = Model(self.capacity, window)
        self.last: dict[int, int] = {}  # neuron -> step last wanted (every neuron ever wanted)
        self.step = 0
        self.window = window  # as applied by the last admission
        self.scratch = AlignedBuf(max(1, n) * bb)

    @rule(
        picks=st.lists(st.integers(0, 2**31), max_size=50),
        dt=st.integers(0, 3),
        background=st.booleans(),
        as_tensor=st.booleans(),
    )
    def admit(self, picks, dt, background, as_tensor):
        self._admit([p % self.n for p in picks], dt, background, as_tensor)

    @rule(
        start=st.integers(0, 2**31),
        length=st.integers(1, 60),
        stride=st.integers(1, 3),
        dt=st.integers(0, 2),
        background=st.booleans(),
    )
    def admit_run(self, start, length, stride, dt, background):
        """A drifting run of neighbours: hits, bridged gaps and capacity pressure."""
        self._admit([(start % 8 + k * stride) % self.n for k in range(length)], dt, background, False)

    def _admit(self, wanted, dt, background, as_tensor):
        self.step += dt
        arg = torch.tensor(wanted, dtype=torch.int64) if as_tensor else np.array(wanted, dtype=np.uint32)
        before = self.cache.stats()
        old_rows = self.rows()
        if background:
            adm = self.cache.begin(arg, self.step)
            # While the fill runs: rows below ready_rows hold what they held, the rest fill.
            states = self.cache.row_states()
            assert set(states[adm.ready_rows : adm.total_rows].tolist()) <= {FILLING, READY}
            assert (states[: adm.ready_rows] == READY).all() and (states[adm.total_rows :] == EMPTY).all()
            # ...and so do the rows between them that this fill does not write (fill_holes puts
            # new neurons between live rows): compute may take every row but filled_rows.
            filled = set(adm.filled_rows.tolist())
            for row in range(adm.total_rows):
                if row not in filled:
                    assert states[row] == READY
                    j = int(self.cache.slot_neurons()[row])
                    assert np.array_equal(self.row(row), bundle(self.data, self.offset, self.bb, j))
            self.cache.wait()
            assert not self.cache.pending and self.cache.is_ready()
        else:
            adm = self.cache.admit(arg, self.step)
        for j in wanted:
            self.last[j] = self.step
        self.window = self.cache.window
        hits, appended, overflow, ew, ec = self.model.step(wanted, self.step)

        # The model's exact outcome: nothing evicted that the window or capacity did not force.
        assert (adm.hits, adm.evicted_window, adm.evicted_capacity) == (hits, ew, ec)
        assert adm.overflow.tolist() == overflow
        # New neurons land at or after ready_rows (holes left by evictions, then after the
        # block), in store order (neighbouring bundles may share a read); ready_rows is the first.
        if appended:
            new_rows = [int(r) for r in self.cache.rows_of(sorted(appended))]
            assert new_rows == sorted(new_rows) and new_rows[0] == adm.ready_rows
            assert new_rows[-1] < adm.total_rows
        assert adm.filled_rows.tolist() == (new_rows if appended else [])
        assert adm.misses == len(appended)
        assert sorted(self.cache.slot_neurons().tolist()) == sorted(self.model.live)
        assert self.cache.ready_rows == self.cache.live == adm.total_rows == len(self.model.live)
        # Rows that survived did not change content (moved rows carry their neuron's bytes).
        for j, content in old_rows.items():
            if j in self.cache:
                assert np.array_equal(self.row(int(self.cache.rows_of([j])[0])), content)

        # Every wanted neuron is live, or overflowed because capacity was full of wanted ones.
        live = set(self.cache.slot_neurons().tolist())
        assert set(wanted) <= live | set(overflow)
        if overflow:
            assert len(live) == self.capacity
            assert all(self.last[j] >= self.step for j in live), "overflow while an old neuron stayed"

        # Bytes: the appended bundles' pages plus bridged gaps, nothing else.
        after = self.cache.stats()
        p = plan(
            appended,
            self.bb,
            self.offset,
            self.n,
            profile=self.profile,
            concurrency=self.reader.concurrency,
            **self.options,
        )
        assert adm.bytes_read == after["bytes_read"] - before["bytes_read"] == (p.buffer_bytes if appended else 0)
        assert adm.bytes_useful == after["bytes_useful"] - before["bytes_useful"] == len(appended) * self.bb
        assert adm.requests == after["requests"] - before["requests"] == (len(p) if appended else 0)
        # Page-multiple bundles with no bridged gap read straight into rows; others are staged.
        direct = after["bytes_direct"] - before["bytes_direct"]
        if self.bb % PAGE:
            assert direct == 0
        elif appended and p.buffer_bytes == len(appended) * self.bb and new_rows[-1] - new_rows[0] == len(new_rows) - 1:
            assert direct == p.buffer_bytes  # no gap, rows side by side: all direct
        else:
            assert direct <= adm.bytes_read
        if not self.options["allow_whole"]:
            assert adm.bytes_read == sparse_bytes(appended, self.bb, self.options["max_gap_bytes"])
        assert (after["misses"] - before["misses"], after["overflow"] - before["overflow"]) == (
            len(appended),
            len(overflow),
        )

        # What did not fit streams through a scratch buffer, packed in the given order.
        if overflow:
            got = self.cache.read_neurons(np.array(overflow), self.scratch)
            assert got == len(overflow)
            rows = as_array(self.scratch)[: got * self.bb].reshape(got, self.bb)
            for k, j in enumerate(overflow):
                assert np.array_equal(rows[k], bundle(self.data, self.offset, self.bb, j))

    @rule(window=st.one_of(st.integers(0, 4), st.just(BIG_WINDOW)))
    def set_window(self, window):
        self.cache.window = window
        self.model.window = window

    @precondition(lambda self: hasattr(self, "cache"))
    @rule(bad=st.integers(0, 5))
    def out_of_range_changes_nothing(self, bad):
        snapshot = (self.cache.slot_neurons().tolist(), self.cache.stats())
        with pytest.raises(ValueError, match="out of range"):
            self.cache.begin([0, self.n + bad], self.step + 1)
        with pytest.raises(ValueError):
            self.cache.admit([-1], self.step + 1)
        assert (self.cache.slot_neurons().tolist(), self.cache.stats()) == snapshot

    def row(self, r: int) -> np.ndarray:
        return as_array(self.cache.slots)[r * self.bb : (r + 1) * self.bb]

    def rows(self) -> dict[int, np.ndarray]:
        return {int(j): self.row(r).copy() for r, j in enumerate(self.cache.slot_neurons())}

    @invariant()
    def structure(self):
        if not hasattr(self, "cache"):
            return
        c, n = self.cache, self.n
        rows = c.slot_neurons()
        assert len(rows) == c.live == len(c) <= c.capacity
        assert len(set(rows.tolist())) == len(rows) and ((rows >= 0) & (rows < n)).all()
        states = c.row_states()
        assert len(states) == c.capacity
        assert (states[: c.live] == READY).all() and (states[c.live :] == EMPTY).all()
        # Index and row map agree, for every neuron of the layer.
        where = c.rows_of(np.arange(n))
        assert (where[rows] == np.arange(len(rows))).all()
        assert (np.delete(where, rows) == -1).all()
        assert all((j in c) == (where[j] >= 0) for j in range(0, n, max(1, n // 7)))
        # Bytes equal the file's; no neuron older than the window survives.
        for r, j in enumerate(rows.tolist()):
            assert np.array_equal(self.row(r), bundle(self.data, self.offset, self.bb, j)), (r, j)
            assert self.step - self.last[j] <= self.window


CacheMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=16, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCacheMachine = CacheMachine.TestCase


# -- concurrency ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    """Two float32 layer regions of 256 bundles of 4096 values (16 KiB) back to back."""
    n, bb = 256, 16384
    path = tmp_path_factory.mktemp("cache") / "ffn.bin"
    data = np.random.default_rng(1).standard_normal(2 * n * bb // 4).astype(np.float32).view(np.uint8)
    path.write_bytes(data.tobytes())
    return path, data, n, bb


def test_fill_one_layer_while_computing_on_another(two_layers):
    path, data, n, bb = two_layers
    reader = Reader(path, concurrency=8)
    caches = [NeuronCache(reader, k * n * bb, n, bb, 160, 1) for k in range(2)]
    views = [cache_rows(c, torch.float32) for c in caches]  # (160, 4096) each
    expect = torch.from_numpy(data.view(np.float32).copy()).view(2, n, bb // 4)
    assert views[0].data_ptr() == caches[0].slots.address
    x = torch.randn(4096, 8)
    rng = np.random.default_rng(0)
    caches[1].admit(rng.choice(n, 120, replace=False), 0)
    overlapped = 0
    for step in range(1, 61):
        a, b = step % 2, 1 - step % 2
        adm = caches[a].begin(rng.choice(n, 120, replace=False), step)  # reads in the background
        overlapped += not caches[a].is_ready()
        rows_b = caches[b].slot_neurons()
        got = views[b][: caches[b].ready_rows] @ x  # compute on layer b
        assert torch.allclose(got, expect[b][torch.from_numpy(rows_b)] @ x, rtol=1e-5, atol=1e-4)
        caches[a].wait()
        rows_a = torch.from_numpy(caches[a].slot_neurons())
        assert adm.total_rows == len(rows_a)
        assert torch.equal(views[a][: len(rows_a)], expect[a][rows_a]), f"step {step}"
    assert overlapped > 0, "begin() never returned before its reads finished"


def test_python_runs_during_a_cache_read(two_layers):
    path, data, n, bb = two_layers
    reader = Reader(path, concurrency=4)
    counts = []
    with python_counter() as count:
        for _ in range(3):
            cache = NeuronCache(reader, 0, 2 * n, bb, 2 * n, 0)
            c0 = count[0]
            cache.admit(np.arange(2 * n), 0)  # 8 MiB, GIL released
            counts.append(count[0] - c0)
            got = as_array(cache.slots).reshape(2 * n, bb)
            assert np.array_equal(got[7], data[7 * bb : 8 * bb])
    assert max(counts) > 1000, f"counter advanced {counts} during cache reads"


# -- faults and lifetime -------------------------------------------------------------------------


@pytest.mark.parametrize("background", [True, False])
def test_io_error_leaves_nothing_presented_as_filled(tmp_path, background):
    n, bb = 64, 3456
    path = tmp_path / "ffn.bin"
    data = write_store(path, n, bb, PAGE, seed=3)
    cache = NeuronCache(Reader(path, concurrency=4), PAGE, n, bb, 32, 10)
    cache.admit([0, 1, 2], 0)
    os.truncate(path, PAGE + 20 * bb)  # bundles past ~20 are gone
    with pytest.raises(FlashIOError) as e:
        if background:
            adm = cache.begin([1, 40, 50], 1)
            assert (adm.ready_rows, adm.total_rows) == (3, 5) and 40 in cache
            cache.wait()
        else:
            cache.admit([1, 40, 50], 1)
    assert str(path) in str(e.value) and "offset" in str(e.value)
    assert 40 not in cache and 50 not in cache
    assert (cache.live, cache.ready_rows, cache.pending) == (3, 3, False)
    assert (cache.row_states()[3:] == EMPTY).all()
    assert cache.stats()["failed_fills"] == 1
    for r, j in enumerate(cache.slot_neurons()):
        assert np.array_equal(as_array(cache.slots)[r * bb : (r + 1) * bb], bundle(data, PAGE, bb, j))
    # An unwaited failure surfaces at the next begin(), which then changes nothing.
    cache.begin([45], 2)
    with pytest.raises(FlashIOError):
        cache.begin([3], 2)
    assert 45 not in cache and 3 not in cache
    cache.admit([3], 2)
    assert 3 in cache


def test_capacity_zero_and_full(tmp_path):
    n, bb = 40, 100
    path = tmp_path / "ffn.bin"
    write_store(path, n, bb, 0, seed=4)
    reader = Reader(path, concurrency=2)
    zero = NeuronCache(reader, 0, n, bb, 0, 3)
    adm = zero.begin([5, 6, 5], 0)
    zero.wait()
    assert (adm.total_rows, adm.overflow.tolist(), len(zero.slots)) == (0, [5, 6], 0)
    assert cache_rows(zero, torch.uint8).shape == (0, bb)
    full = NeuronCache(reader, 0, n, bb, n, BIG_WINDOW)
    rng = np.random.default_rng(0)
    seen: set[int] = set()
    for step in range(40):
        wanted = rng.choice(n, 12).tolist()
        adm = full.admit(wanted, step)
        assert adm.misses == len(set(wanted) - seen) and not adm.overflow.size
        seen |= set(wanted)
    assert full.stats()["bytes_useful"] == len(seen) * bb  # never re-read
    assert full.stats()["evicted_window"] + full.stats()["evicted_capacity"] == 0
    with pytest.raises(ValueError, match="capacity"):
        NeuronCache(reader, 0, n, bb, n + 1, 1)


def test_a_long_run_of_page_bundles_is_cut_between_bundles(tmp_path):
    """A run longer than one request is cut into pieces of whole bundles, so every piece is read
    straight into its rows (found by the state machine: 21 bundles of 16 KiB cut into pieces of
    14 pages went through staging)."""
    n, bb = 21, 16384
    path = tmp_path / "ffn.bin"
    data = write_store(path, n, bb, 0, seed=781)
    cache = NeuronCache(
        Reader(path, concurrency=32),
        0,
        n,
        bb,
        n,
        BIG_WINDOW,
        profile=Profile.default(),
        allow_whole=False,
        max_gap_bytes=0,
    )
    adm = cache.admit(list(range(n)), 0)
    assert adm.requests > 1 and cache.stats()["bytes_direct"] == adm.bytes_read == n * bb
    for j in range(n):
        assert np.array_equal(
            cache_rows(cache, torch.uint8)[int(cache.rows_of([j])[0])].numpy(), bundle(data, 0, bb, j)
        )


def test_slot_matrix_is_zero_copy_and_outlives_the_cache(tmp_path):
    n, bb = 16, 4096
    path = tmp_path / "ffn.bin"
    data = write_store(path, n, bb, 0, seed=5)
    cache = NeuronCache(Reader(path), 0, n, bb, 8, 1)
    cache.admit([3, 9], 0)
    slots = cache.slots
    assert cache.slots is slots  # one object, always
    t = cache_rows(cache, torch.float32)
    assert t.shape == (8, 1024) and t.data_ptr() == slots.address
    assert np.asarray(slots).ctypes.data == slots.address
    owner = weakref.ref(slots)
    del cache, slots
    gc.collect()
    assert owner() is not None, "the tensor still views the slot matrix"
    assert np.array_equal(t[1].view(torch.uint8).numpy(), bundle(data, 0, bb, 9))
    del t
    gc.collect()
    assert owner() is None


def test_layer_cache_helper_and_read_neurons_checks(tmp_path):
    from llmflash.store import LayerRegion

    n, bb = 30, 3456
    path = tmp_path / "ffn.bin"
    data = write_store(path, n, bb, 0, seed=6)
    region = LayerRegion(0, 0, n, bb, align_up(n * bb), (("up", bb),), 0, None)
    cache = layer_cache(Reader(path), region, capacity=4, window=2, profile=Profile.default())
    adm = cache.admit(list(range(6)), 0)
    assert adm.overflow.tolist() == [4, 5]
    with pytest.raises(ValueError, match="slot matrix"):
        cache.read_neurons([4], cache.slots)
    with pytest.raises(ValueError, match="cannot hold"):
        cache.read_neurons([4, 5], AlignedBuf(bb))
    out = AlignedBuf(2 * bb)
    assert cache.read_neurons(adm.overflow, out) == 2
    assert np.array_equal(as_array(out)[bb:], bundle(data, 0, bb, 5))
    assert "NeuronCache(live=4" in repr(cache) and "Admission(" in repr(adm)


def test_overflow_reader_runs_beside_the_owner(tmp_path):
    """OverflowReader.read on a worker thread while the owning thread begins and waits for fills
    (as flash reads a token's overflow beside its fill): the file's bytes every time, the same
    checks as read_neurons, and the counters of the one cache."""
    from concurrent.futures import ThreadPoolExecutor

    from llmflash.store import LayerRegion

    n, bb = 300, 3456
    path = tmp_path / "ffn.bin"
    data = write_store(path, n, bb, 0, seed=7)
    region = LayerRegion(0, 0, n, bb, align_up(n * bb), (("up", bb),), 0, None)
    cache = layer_cache(Reader(path), region, capacity=20, window=1, profile=Profile.default())
    reader = cache.overflow_reader()
    assert "OverflowReader(300 neurons of 3456 bytes" in repr(reader)
    with pytest.raises(ValueError, match="slot matrix"):
        reader.read([4], cache.slots)
    with pytest.raises(ValueError, match="out of range"):
        reader.read([n], AlignedBuf(bb))
    out = AlignedBuf(80 * bb)
    with ThreadPoolExecutor(1) as pool:
        for step in range(12):
            wanted = sorted({(7 * k + 31 * step) % n for k in range(60)})
            adm = cache.begin(wanted, step)
            overflow = adm.overflow.copy()
            job = pool.submit(reader.read, overflow, out)
            cache.wait()  # the owner's mutable call while the worker reads
            assert job.result() == len(overflow) > 0
            got = as_array(out)
            for k, j in enumerate(overflow):
                assert np.array_equal(got[k * bb : (k + 1) * bb], bundle(data, 0, bb, int(j)))
    assert cache.stats()["overflow"] > 0
