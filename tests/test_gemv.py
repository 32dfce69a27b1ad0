"""The native decode product over half-precision bundle rows (strategies.base.rows_gemv):
equal to a float64 reference for any row stride, zero rows skipped, bad layouts rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash._native import f16_rows_gemv
from llmflash.strategies.base import rows_gemv


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), dim=st.integers(1, 80), pad=st.integers(0, 20), zeros=st.floats(0, 1),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), seed=st.integers(0, 2**31))
def test_rows_gemv_equals_reference(n, dim, pad, zeros, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bundles = (torch.randn(n, dim + pad, generator=g) * 3).to(dtype)
    down = bundles[:, pad:]                                  # a strided view, like the cache's rows
    h = torch.randn(n, generator=g)
    h[torch.rand(n, generator=g) < zeros] = 0.0
    want = (h.double()[:, None] * down.double()).sum(0) if n else torch.zeros(dim, dtype=torch.float64)
    got = rows_gemv(down, h)
    assert got.dtype == torch.float32 and got.shape == (dim,)
    tol = 1e-4 if dtype == torch.float16 else 2e-2          # torch's bfloat16 mv rounds h to bfloat16
    scale = float((h.abs().double()[:, None] * down.double().abs()).sum(0).max()) if n else 0.0
    assert float((got.double() - want).abs().max()) <= tol * (1.0 + scale)


def test_native_rejects_bad_layouts():
    rows = np.zeros((4, 8), dtype=np.int16)
    with pytest.raises(ValueError, match="activations"):
        f16_rows_gemv(rows, np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="stride"):
        f16_rows_gemv(rows[:, ::2], np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="stride"):
        f16_rows_gemv(rows[::-1], np.zeros(4, dtype=np.float32))
    assert f16_rows_gemv(rows, np.ones(4, dtype=np.float32), 1).tolist() == [0.0] * 8
