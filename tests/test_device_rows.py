"""The host side of flash's device rows (strategies/flash/device_rows.py), on CPU tensors: moves
replayed as the Rust cache lists them, and a fill's bundles landed into their rows, or, when the
upload fails, dropped by the next admission instead of trusted."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash.io import NeuronCache, Reader
from llmflash.strategies.flash.device_rows import Uploader, apply_moves, land

PAGE = 4096


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), max_size=12))
def test_apply_moves_equals_moves_in_order(moves):
    """Any list of moves (chains and repeated destinations included, as moves left by a failed
    admission can make) ends as applying them one by one."""
    rows = torch.arange(40, dtype=torch.float32).view(10, 4)
    want = rows.clone().numpy()
    for d, s in moves:
        want[d] = want[s]
    dst = np.array([d for d, _ in moves], dtype=np.int64)  # as Admission.moves gives them
    src = np.array([s for _, s in moves], dtype=np.int64)
    assert apply_moves(rows, SimpleNamespace(moves=(dst, src))) == len(moves)
    assert np.array_equal(rows.numpy(), want)


def store(tmp_path, n: int, bb: int) -> tuple[Reader, np.ndarray]:
    data = np.random.default_rng(5).integers(0, 256, PAGE + n * bb + PAGE, dtype=np.uint8)
    path = tmp_path / "ffn.bin"
    path.write_bytes(data.tobytes())
    return Reader(path, concurrency=2), data


def bundles(buf, k: int, bb: int) -> torch.Tensor:
    return torch.frombuffer(buf, dtype=torch.uint8)[: k * bb].view(k, bb)


class Failing(Uploader):
    def upload(self, dst, rows, host):
        raise RuntimeError("device lost")


def test_land_takes_bundles_only_once_they_are_up(tmp_path):
    n, bb = 32, 1000
    reader, data = store(tmp_path, n, bb)
    cache = NeuronCache(reader, PAGE, n, bb, 16, 4, external_rows=True)
    rows = torch.zeros(16, bb, dtype=torch.uint8)
    up = Uploader(torch.device("cpu"), bb, torch.uint8, chunk_rows=2)

    def view(buf, k):
        return bundles(buf, k, bb)

    adm = cache.admit([3, 1, 2], 0)
    assert land(up, rows, cache, adm, view) == 3 and cache.landed() is None
    for r, j in enumerate(cache.slot_neurons()):
        assert np.array_equal(rows[r].numpy(), data[PAGE + j * bb : PAGE + (j + 1) * bb])

    adm = cache.admit([5, 6], 1)
    with pytest.raises(RuntimeError, match="device lost"):
        land(Failing(torch.device("cpu"), bb, torch.uint8, chunk_rows=2), rows, cache, adm, view)
    assert cache.landed() is not None  # never taken: 5 and 6 are not in their rows
    adm = cache.admit([5, 1], 2)
    assert (adm.hits, adm.misses) == (1, 1) and 6 not in cache
    apply_moves(rows, adm)
    land(up, rows, cache, adm, view)
    for r, j in enumerate(cache.slot_neurons()):
        assert np.array_equal(rows[r].numpy(), data[PAGE + j * bb : PAGE + (j + 1) * bb]), (r, j)
