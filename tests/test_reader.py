"""The Reader and AlignedBuf through Python: zero-copy views (pointer identity; the memory
outlives the Rust handle exactly while something views it), the GIL released during reads (a
pure-Python thread keeps running; two reading threads overlap in time), faults (a file
truncated under an open reader, reads past the end: FlashIOError naming the file), and the
buffered fallback where the filesystem refuses O_DIRECT, with its warning."""

from __future__ import annotations

import gc
import os
import subprocess
import threading
import time
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import python_counter
from store_builders import make_store

from llmflash import FlashIOError, LlmflashError
from llmflash import store as S
from llmflash._native import AlignedBuf, Reader, plan
from llmflash.io import as_array, as_tensor, read_neurons

BIG = 96 << 20  # large enough that one read takes tens of milliseconds on the disk
ENGINES = ["threads", "io_uring", "auto"]
engines = pytest.mark.parametrize("engine", ENGINES)


def write_random(path: Path, size: int, seed: int = 0) -> np.ndarray:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    return data


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> tuple[Path, np.ndarray]:
    path = tmp_path_factory.mktemp("reader") / "big.bin"
    return path, write_random(path, BIG)


# -- zero copy ----------------------------------------------------------------------------------


def test_aligned_buf_basics():
    for n in (0, 1, 3456, 4096, 10_000):
        b = AlignedBuf(n)
        assert len(b) == n and b.address % 4096 == 0 and b.capacity % 4096 == 0 and b.capacity >= max(n, 1)
        assert bytes(memoryview(b)) == b"\0" * n
    b = AlignedBuf(8)
    memoryview(b)[3] = 7
    assert np.asarray(b)[3] == 7 and not memoryview(b).readonly and memoryview(b).format == "B"
    with pytest.raises(OverflowError):
        AlignedBuf(-1)
    with pytest.raises(MemoryError):
        AlignedBuf(1 << 62)


def test_zero_copy_views_and_lifetime(big_file):
    path, data = big_file
    reader = Reader(path)
    buf = reader.read_region(4096, 1 << 20)
    addr = buf.address
    t = as_tensor(buf, torch.float16)
    a = np.asarray(buf)
    assert t.data_ptr() == addr and a.ctypes.data == addr  # pointer identity
    assert torch.frombuffer(buf, dtype=torch.uint8).data_ptr() == addr
    assert t.shape == ((1 << 20) // 2,)
    expect = torch.from_numpy(data[4096 : 4096 + (1 << 20)].copy()).view(torch.float16)
    assert torch.equal(t.view(torch.int16), expect.view(torch.int16))
    # Writes through one view are seen by the others: same memory.
    a[0] = 0xAB
    assert t.view(torch.uint8)[0] == 0xAB
    # The Rust handle goes, the tensor keeps the memory alive...
    alive = weakref.ref(buf)
    del buf, a
    gc.collect()
    assert alive() is not None, "a tensor still views the buffer: it must stay alive"
    junk = [np.ones(1 << 20, dtype=np.uint8) for _ in range(8)]  # churn the allocator
    assert t.data_ptr() == addr and t.view(torch.uint8)[0] == 0xAB
    assert torch.equal(t.view(torch.int16)[1:], expect.view(torch.int16)[1:])
    # ...and only while something views it.
    del t, junk
    gc.collect()
    assert alive() is None, "nothing views the buffer any more: it must be freed"


@engines
def test_read_into_many_buffers(big_file, engine):
    path, data = big_file
    reader = Reader(path, concurrency=4, engine=engine)
    assert reader.engine == engine
    bufs = [AlignedBuf(1 << 16) for _ in range(3)]
    reqs = [
        (0, 4096, bufs[0], 0),
        (1 << 20, 8192, bufs[0], 8192),
        (12345, 3456, bufs[1], 100),
        (BIG - 65536, 65536, bufs[2], 0),
    ]
    reader.read(reqs)
    for off, n, b, d in reqs:
        assert np.array_equal(as_array(b)[d : d + n], data[off : off + n])
    s = reader.stats()
    assert (s["requests"], s["batches"], s["bytes_read"]) == (4, 1, 4096 + 8192 + 3456 + 65536)
    reader.reset_stats()
    assert all(v == 0 for v in reader.stats().values())
    with pytest.raises(ValueError, match="overflow"):
        reader.read([(0, 4096, bufs[0], 65536 - 100)])
    with pytest.raises(ValueError, match="overlap"):
        reader.read([(0, 4096, bufs[0], 0), (0, 4096, bufs[0], 2048)])
    with pytest.raises(ValueError, match="concurrency"):
        Reader(path, concurrency=0)
    with pytest.raises(ValueError, match="engine"):
        Reader(path, engine="aio")
    reader.read([])


# -- the GIL is released during reads ---------------------------------------------------------------


@engines
def test_python_thread_runs_during_a_read(big_file, engine):
    path, _ = big_file
    reader = Reader(path, engine=engine)
    with python_counter() as count:
        c0, t0 = count[0], time.perf_counter()
        reader.read_region(0, BIG)
        c1, dt = count[0], time.perf_counter() - t0
    # Holding the GIL for the whole read would freeze the counter (a few increments at most).
    assert c1 - c0 > 1000, f"counter advanced {c1 - c0} during a {dt * 1e3:.0f} ms read"


@engines
def test_two_reading_threads_overlap(big_file, engine):
    path, data = big_file
    reader = Reader(path, engine=engine)
    spans: dict[int, tuple[float, float]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(k: int):
        try:
            p = plan(np.arange(k, 20000, 3), 4096, 0, 20000, allow_whole=False, max_gap_bytes=0)
            barrier.wait()
            t0 = time.perf_counter()
            buf = reader.read_plan(p)
            spans[k] = (t0, time.perf_counter())
            j = int(p.neurons[5])
            at = int(p.landing[5])
            assert np.array_equal(as_array(buf)[at : at + 4096], data[j * 4096 : (j + 1) * 4096])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    (a0, a1), (b0, b1) = spans[0], spans[1]
    assert a0 < b1 and b0 < a1, f"reads did not overlap in time: {spans}"
    assert reader.stats()["batches"] == 2


# -- faults --------------------------------------------------------------------------------------


@engines
def test_truncated_under_an_open_reader(tmp_path, engine):
    path = tmp_path / "ffn.bin"
    data = write_random(path, 4 << 20)
    reader = Reader(path, engine=engine)
    assert np.array_equal(as_array(reader.read_region(0, 1 << 20)), data[: 1 << 20])
    os.truncate(path, 1 << 20)
    with pytest.raises(FlashIOError) as e:
        reader.read_region(0, 4 << 20)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg and "1048576" in msg
    assert e.value.path == str(path)
    assert isinstance(e.value, OSError) and isinstance(e.value, LlmflashError)


@engines
def test_read_past_end(tmp_path, engine):
    path = tmp_path / "small.bin"
    write_random(path, 3 * 4096)
    reader = Reader(path, engine=engine)
    assert reader.file_size() == 3 * 4096
    with pytest.raises(FlashIOError, match=r"8192 bytes at offset 8192") as e:
        reader.read([(8192, 8192, AlignedBuf(8192), 0)])
    assert str(path) in str(e.value)
    with pytest.raises(FlashIOError, match="offset 1048576"):
        reader.read_region(1 << 20, 4096)
    # A plan over a region the file does not hold (a manifest lying about offsets).
    p = plan([0, 5], 4096, 0, 6)
    with pytest.raises(FlashIOError):
        reader.read_plan(p)


def test_open_errors(tmp_path):
    with pytest.raises(FlashIOError, match="cannot open") as e:
        Reader(tmp_path / "missing.bin")
    assert e.value.errno == 2
    with pytest.raises(FlashIOError, match="not a regular file"):
        Reader(tmp_path)


# -- the buffered fallback ---------------------------------------------------------------------------


def check_store_reads(folder: Path, expect_direct: bool | None) -> None:
    store = S.Store(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reader = Reader(store.ffn_path, concurrency=4)
    if expect_direct is not None:
        assert reader.direct == expect_direct
    ours = [w for w in caught if "O_DIRECT" in str(w.message)]
    if reader.direct:
        assert not ours
    else:
        assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
        assert str(store.ffn_path) in str(ours[0].message)
    for L in store.layers:
        ref = store.read_layer(L.index).view(torch.uint8).numpy()
        wanted = np.arange(0, L.n_neurons, 3)
        ids, rows = read_neurons(reader, L, wanted)
        assert np.array_equal(rows, ref[ids])
        whole = reader.read_region(L.offset, L.region_bytes)
        assert np.array_equal(as_array(whole)[: L.payload_bytes].reshape(L.n_neurons, -1), ref)


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_store_on_tmpfs(tmp_path_factory):
    # tmpfs refuses O_DIRECT before Linux 6.6 and accepts it since: either way the store reads
    # correctly, and a reader that fell back says so with one warning.
    folder = Path(f"/dev/shm/llmflash-test-{os.getpid()}")
    try:
        make_store(folder, "float16", ffn=(40, 77))
        check_store_reads(folder, None)
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount (it never supports O_DIRECT), where this process may mount; else skip."""
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("cannot run mount")
    if r.returncode != 0:
        pytest.skip("not allowed to mount a ramfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, timeout=10)


def test_fallback_where_o_direct_is_refused(ramfs):
    folder = make_store(ramfs / "store", "float32", ffn=(40, 77))
    check_store_reads(folder, expect_direct=False)
    # Asking for buffered reads is not a fallback: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Reader(folder / S.FFN, direct=False).direct


def test_native_argument_errors_are_llmflash_errors(tmp_path):
    """rust/py/errors.rs: the core's Invalid and Profile errors are InvalidArgumentError, which is
    both an LlmflashError and a ValueError."""
    from llmflash._native import Profile
    from llmflash.errors import InvalidArgumentError, LlmflashError

    f = tmp_path / "f.bin"
    f.write_bytes(b"\0" * 8192)
    for make in (lambda: Reader(f, engine="bogus"), lambda: Profile.from_json("{")):
        with pytest.raises(InvalidArgumentError) as e:
            make()
        assert isinstance(e.value, LlmflashError) and isinstance(e.value, ValueError)
