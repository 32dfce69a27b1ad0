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
@given(
    n=st.integers(0, 300),
    dim=st.integers(1, 80),
    pad=st.integers(0, 20),
    zeros=st.floats(0, 1),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_rows_gemv_equals_reference(n, dim, pad, zeros, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    bundles = (torch.randn(n, dim + pad, generator=g) * 3).to(dtype)
    down = bundles[:, pad:]  # a strided view, like the cache's rows
    h = torch.randn(n, generator=g)
    h[torch.rand(n, generator=g) < zeros] = 0.0
    want = (h.double()[:, None] * down.double()).sum(0) if n else torch.zeros(dim, dtype=torch.float64)
    got = rows_gemv(down, h)
    assert got.dtype == torch.float32 and got.shape == (dim,)
    tol = 1e-4 if dtype == torch.float16 else 2e-2  # torch's bfloat16 mv rounds h to bfloat16
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


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 200),
    dim=st.integers(1, 64),
    gated=st.booleans(),
    with_bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_fused_decode_ffn_equals_reference(n, dim, gated, with_bias, seed):
    """rows_ffn's native one-pass path (one token, float16 rows) against a float64 FFN."""
    from types import SimpleNamespace

    from llmflash.strategies.base import rows_ffn

    g = torch.Generator().manual_seed(seed)
    fields = 3 if gated else 2
    rows = (torch.randn(n, fields * dim, generator=g) * 0.5).half()
    x = torch.randn(1, dim, generator=g)
    bias = torch.randn(n, generator=g) if with_bias and not gated else None
    config = SimpleNamespace(
        gated=gated,
        act="silu" if gated else "relu",
        dim=dim,
        bundle_fields=[("gate", dim)] * gated + [("up", dim), ("down", dim)],
    )
    r, xd = rows.double(), x[0].double()
    if gated:
        gate, up, down = r[:, :dim], r[:, dim : 2 * dim], r[:, 2 * dim :]
        h = torch.nn.functional.silu(gate @ xd) * (up @ xd)
    else:
        up, down = r[:, :dim], r[:, dim:]
        h = torch.relu(up @ xd + (bias.double() if bias is not None else 0.0))
    want = h @ down
    got = rows_ffn(x, rows, config, bias)
    assert got.shape == (1, dim) and got.dtype == torch.float32
    scale = float((h.abs()[:, None] * down.abs()).sum(0).max())
    assert float((got[0].double() - want).abs().max()) <= 1e-4 * (1.0 + scale)


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 70),
    dim=st.integers(1, 90),
    pad=st.integers(0, 9),
    threads=st.integers(1, 2),
    seed=st.integers(0, 2**31),
)
def test_native_matvec_equals_reference(out, dim, pad, threads, seed):
    """f16_matvec (the decode product of a float16 projection) against float64, any row stride."""
    from llmflash._native import f16_matvec

    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(out, dim + pad, generator=g)).half()[:, pad:]
    x = torch.randn(dim, generator=g)
    got = torch.from_numpy(f16_matvec(w.view(torch.int16).numpy(), x.numpy(), threads))
    want = w.double() @ x.double()
    assert got.dtype == torch.float32 and got.shape == (out,)
    assert float((got.double() - want).abs().max()) <= 1e-5 * (1.0 + float((w.double().abs() @ x.double().abs()).max()))


def test_native_matvec_rejects_bad_shapes():
    from llmflash._native import f16_matvec

    with pytest.raises(ValueError, match="columns"):
        f16_matvec(np.zeros((4, 8), dtype=np.int16), np.zeros(7, dtype=np.float32))
    with pytest.raises(ValueError, match="stride"):
        f16_matvec(np.zeros((4, 8), dtype=np.int16)[:, ::2], np.zeros(4, dtype=np.float32))


def test_decode_threads_restores_torch_and_routes_products():
    """Inside decode_threads: torch on one thread, native kernels on the outer count, float16 rows
    through the native product (equal to F.linear within float16 output rounding); restored
    after, also when the body raises; nested and off calls change nothing."""
    from llmflash.models.layers import linear
    from llmflash.threads import decode_threads, in_decode, native_threads

    outer = torch.get_num_threads()
    w, x, b = torch.randn(300, 64).half(), torch.randn(1, 64), torch.randn(300)
    ref = torch.nn.functional.linear(x.half().double(), w.double(), b.double())  # x rounded as F.linear does
    with decode_threads():
        assert in_decode() == (outer > 1)
        assert torch.get_num_threads() == (1 if outer > 1 else outer) and native_threads() == outer
        with decode_threads():
            assert native_threads() == outer
        got = linear(x, w, b)
    assert torch.get_num_threads() == outer and not in_decode()
    assert got.dtype == torch.float32 and float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
    with pytest.raises(RuntimeError), decode_threads():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == outer and not in_decode()
    with decode_threads(False):
        assert not in_decode() and torch.get_num_threads() == outer
