"""The read planner through the Python binding: random wanted sets, bundle sizes (3456 and
others that are not multiples of 4096) and disk profiles; every wanted bundle lands exactly once
where the plan says, requests are aligned, inside the region and within the size cap, bridged
gaps are within the allowance; and bytes read through plan + Reader equal the file's bytes and
the store's own layer reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from store_builders import make_store

from llmflash import StoreError
from llmflash import store as S
from llmflash._native import AlignedBuf, Profile, Reader, plan
from llmflash.io import as_array, read_neurons

PAGE = 4096
FILE_BYTES = 12 << 20

PROFILES = [
    Profile.default(),
    Profile([4096, 1 << 20], [1, 32], [[100.0, 100.0], [25600.0, 25600.0]], "flat"),  # no overhead
    Profile([4096, 1 << 20], [1], [[10.0], [3000.0]], "steep"),  # costly requests
]


def align_up(n: int) -> int:
    return (n + PAGE - 1) // PAGE * PAGE


def check_plan(p, wanted: list[int], n: int, bb: int, offset: int, max_request: int) -> None:
    """The planner's contract, checked from outside."""
    want = sorted(set(wanted))
    assert p.neurons.tolist() == want
    assert p.neurons.dtype == np.int64 and p.landing.dtype == np.int64
    assert p.useful_bytes == len(want) * bb
    lo, hi = offset, offset + align_up(n * bb)
    reqs = p.requests
    dest, prev_end = 0, lo
    for off, ln, d in reqs:
        assert off % PAGE == 0 and ln % PAGE == 0 and ln > 0
        assert prev_end <= off and off + ln <= hi
        assert ln <= max_request // PAGE * PAGE
        assert d == dest
        dest, prev_end = dest + ln, off + ln
    assert p.buffer_bytes == dest == sum(ln for _, ln, _ in reqs)
    assert p.est_seconds == (p.est_whole_seconds if p.whole_region else p.est_sparse_seconds)
    assert p.est_seconds <= p.est_sparse_seconds
    # Map buffer pages back to file offsets; every byte of every wanted bundle must be there.
    page_file = np.zeros(p.buffer_bytes // PAGE, dtype=np.int64)
    for off, ln, d in reqs:
        page_file[d // PAGE : (d + ln) // PAGE] = off + np.arange(ln // PAGE) * PAGE
    ri, oir = p.request_index, p.offset_in_request
    for k, (j, at) in enumerate(zip(p.neurons.tolist(), p.landing.tolist())):
        assert at + bb <= p.buffer_bytes
        assert reqs[ri[k]][2] + oir[k] == at and oir[k] < reqs[ri[k]][1]
        for t in {0, bb // 2, bb - 1}:
            assert page_file[(at + t) // PAGE] + (at + t) % PAGE == lo + j * bb + t
    if p.whole_region:
        # one span: every page from the first wanted bundle's to the last's
        first, last = want[0], want[-1]
        assert reqs[0][0] == lo + first * bb // PAGE * PAGE
        assert p.buffer_bytes == -(-(last + 1) * bb // PAGE) * PAGE - first * bb // PAGE * PAGE
    else:
        # No unwanted page outside a bridged gap, and no bridged gap over the allowance.
        wanted_pages = set()
        for j in want:
            wanted_pages.update(range(j * bb // PAGE, -(-(j + 1) * bb // PAGE)))
        pages = sorted(p_ for off, ln, _ in reqs for p_ in range((off - lo) // PAGE, (off - lo + ln) // PAGE))
        run, prev = 0, None
        for pg in pages:
            if prev is None or pg != prev + 1:
                assert run == 0 and pg in wanted_pages
            if pg in wanted_pages:
                assert run * PAGE <= p.max_gap_bytes
                run = 0
            else:
                run += 1
            prev = pg
        assert run == 0


bundle_sizes = st.one_of(st.sampled_from([3456, 6912, 4096, 16384, 576, 4097]), st.integers(1, 20000))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 3000),
    bb=bundle_sizes,
    picks=st.lists(st.integers(0, 1 << 31), max_size=300),
    offset_pages=st.integers(0, 1 << 20),
    max_pages=st.integers(1, 300),
    gap=st.one_of(st.none(), st.integers(0, 200_000)),
    allow_whole=st.booleans(),
    conc=st.integers(1, 64),
    prof=st.sampled_from(PROFILES),
    as_numpy=st.booleans(),
)
def test_plan_properties(n, bb, picks, offset_pages, max_pages, gap, allow_whole, conc, prof, as_numpy):
    wanted = [x % n for x in picks]
    max_request = max_pages * PAGE + 123
    ids = np.array(wanted, dtype=np.int64) if as_numpy else wanted
    p = plan(
        ids,
        bb,
        offset_pages * PAGE,
        n,
        profile=prof,
        max_request_bytes=max_request,
        concurrency=conc,
        allow_whole=allow_whole,
        max_gap_bytes=gap,
    )
    if allow_whole and wanted:
        assert p.est_seconds == min(p.est_sparse_seconds, p.est_whole_seconds)
    if not allow_whole:
        assert not p.whole_region
    if gap is not None:
        assert p.max_gap_bytes == gap // PAGE * PAGE
    check_plan(p, wanted, n, bb, offset_pages * PAGE, max_request)


def test_plan_inputs_and_errors():
    for dtype in (np.int64, np.int32, np.uint32, np.uint64):
        p = plan(np.array([9, 2, 2], dtype=dtype), 3456, 0, 10)
        assert p.neurons.tolist() == [2, 9]
    assert plan(np.array([5, 1, 3])[::2], 100, 0, 10).neurons.tolist() == [3, 5]  # strided
    assert plan(torch.tensor([4, 1]), 100, 0, 10).neurons.tolist() == [1, 4]
    assert len(plan([], 100, 0, 10)) == 0
    for bad in ([10], [-1], np.array([1 << 40])):
        with pytest.raises(ValueError, match="out of range"):
            plan(bad, 100, 0, 10)
    with pytest.raises(StoreError, match="not a multiple of 4096"):
        plan([1], 100, 4095, 10)
    with pytest.raises(StoreError, match="bundle_bytes"):
        plan([1], 0, 0, 10)
    with pytest.raises(ValueError, match="max_request_bytes"):
        plan([1], 100, 0, 10, max_request_bytes=4095)


def test_whole_region_chosen_only_when_cheaper():
    # SmolLM2-like: 1536 bundles of 3456 bytes. Every 4th neuron, no bridging: one span wins, from
    # neuron 0's page to neuron 1532's last (2 pages short of the region's end).
    p = plan(np.arange(0, 1536, 4), 3456, 0, 1536, max_gap_bytes=0)
    assert p.whole_region and p.est_whole_seconds < p.est_sparse_seconds
    assert p.buffer_bytes == align_up(1533 * 3456) == align_up(1536 * 3456) - 2 * PAGE
    # A placed layer: wanted neurons only in the first 900 (the pinned ones at the end): the span
    # stops at the last wanted bundle.
    p = plan(np.arange(3, 900, 8), 1012, 0, 1536, max_gap_bytes=0)
    assert p.whole_region and p.requests[0][0] == 0
    assert p.buffer_bytes == align_up(900 * 1012) < 0.6 * align_up(1536 * 1012)
    # The paper's scale: 16 KiB bundles, 2.5% wanted: sparse wins by far.
    p = plan(np.arange(0, 16384, 40), 16384, 0, 16384)
    assert not p.whole_region and p.est_seconds * 5 < p.est_whole_seconds
    # A profile where requests are nearly free makes exact reads win even for dense sets.
    flat = Profile([4096, 1 << 20], [1], [[1e6], [1e6]], "free requests")
    assert not plan(np.arange(0, 1536, 2), 3456, 0, 1536, profile=flat).whole_region


# -- bytes through plan + Reader --------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("planner") / "random.bin"
    data = np.random.default_rng(0).integers(0, 256, FILE_BYTES, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return path, data


@pytest.fixture(scope="module")
def file_reader(random_file) -> Reader:
    return Reader(random_file[0], concurrency=8)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 2500),
    bb=bundle_sizes,
    picks=st.lists(st.integers(0, 1 << 31), max_size=200),
    offset_frac=st.floats(0, 1),
    gap=st.one_of(st.none(), st.integers(0, 64 << 10)),
    allow_whole=st.booleans(),
    max_pages=st.integers(1, 512),
)
def test_plan_read_delivers_file_bytes(
    random_file, file_reader, n, bb, picks, offset_frac, gap, allow_whole, max_pages
):
    path, data = random_file
    region = align_up(n * bb)
    assume(region <= FILE_BYTES)
    offset = int(offset_frac * (FILE_BYTES - region)) // PAGE * PAGE
    wanted = [x % n for x in picks]
    p = plan(wanted, bb, offset, n, max_gap_bytes=gap, allow_whole=allow_whole, max_request_bytes=max_pages * PAGE)
    buf = file_reader.read_plan(p)
    assert len(buf) == p.buffer_bytes
    got = as_array(buf)
    rows = as_array(p.gather(buf)).reshape(len(p.neurons), bb) if len(p.neurons) else None
    for k, (j, at) in enumerate(zip(p.neurons.tolist(), p.landing.tolist())):
        expect = data[offset + j * bb : offset + (j + 1) * bb]
        assert np.array_equal(got[at : at + bb], expect)
        assert np.array_equal(rows[k], expect)


def test_read_plan_into_caller_buffer_and_stats(random_file, file_reader):
    path, data = random_file
    p = plan([3, 1000, 7], 3456, 8192, 2000)
    out = AlignedBuf(p.buffer_bytes + 4096)
    file_reader.reset_stats()
    assert file_reader.read_plan(p, out=out) is out
    for j, at in zip(p.neurons.tolist(), p.landing.tolist()):
        assert np.array_equal(as_array(out)[at : at + 3456], data[8192 + j * 3456 : 8192 + (j + 1) * 3456])
    s = file_reader.stats()
    assert s == {**s, "bytes_read": p.buffer_bytes, "bytes_useful": 3 * 3456, "requests": len(p), "batches": 1}
    assert s["io_ns"] > 0
    with pytest.raises(ValueError, match="smaller than the plan"):
        file_reader.read_plan(p, out=AlignedBuf(p.buffer_bytes - 1))


# -- a real store (StoreWriter) ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_store_bytes_through_plan_and_reader(tmp_path, dtype):
    store = S.Store(make_store(tmp_path / f"s-{dtype}", dtype))
    reader = Reader(store.ffn_path)
    rng = np.random.default_rng(1)
    assert store.layers[0].bundle_bytes == 3 * 576 * S.ITEMSIZE[dtype]
    for L in store.layers:
        ref = store.read_layer(L.index).view(torch.uint8).numpy()  # (n, bundle_bytes)
        for frac in (0.05, 0.3, 0.9, 1.0):
            wanted = rng.choice(L.n_neurons, size=max(1, int(frac * L.n_neurons)), replace=frac > 0.95)
            for gap in (0, None):
                p = plan(wanted, L.bundle_bytes, L.offset, L.n_neurons, max_gap_bytes=gap)
                buf = reader.read_plan(p)
                rows = as_array(p.gather(buf)).reshape(-1, L.bundle_bytes)
                assert np.array_equal(rows, ref[p.neurons])
            ids, rows = read_neurons(reader, L, wanted)
            assert np.array_equal(ids, np.unique(wanted)) and np.array_equal(rows, ref[ids])
        # The whole region, as the naive strategy reads it.
        whole = reader.read_region(L.offset, L.region_bytes)
        assert np.array_equal(as_array(whole)[: L.payload_bytes].reshape(L.n_neurons, -1), ref)
