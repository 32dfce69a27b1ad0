"""The quantized decode kernels (rust/quant.rs) against an independent reference: blocks made
and decoded by the `gguf` package (gguf.quants), products in float64 numpy. Every case runs on
the AVX2 path (where the CPU has it) and on the portable path."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from hypothesis import given, settings
from hypothesis import strategies as st

import llmflash._native as native
from llmflash.errors import InvalidArgumentError

KINDS = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1}
BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


@pytest.fixture(params=["simd", "portable"])
def path(request):
    before = native.q_set_portable(request.param == "portable")
    yield request.param
    native.q_set_portable(before)


def _quantize(kind: str, values: np.ndarray) -> np.ndarray:
    return quants.quantize(values.astype(np.float32), KINDS[kind])


def _values(kind: str, blocks: np.ndarray) -> np.ndarray:
    return quants.dequantize(blocks, KINDS[kind]).astype(np.float64)


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> None:
    scale = max(float(np.abs(want).max(initial=0.0)), 1e-6)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


def _bundles(kind: str, rng, n: int, dim: int, gated: bool, pad: int = 0):
    """n bundles of [gate,] up, down (each dim values, quantized) followed by `pad` spare bytes per
    row, as an (n, bundle bytes) view of a wider array; and the fields' float64 values."""
    count = 3 if gated else 2
    if n == 0:  # gguf.quants cannot quantize no rows
        return np.zeros((0, count * dim // 32 * BLOCK_BYTES[kind]), np.uint8), []
    fields = [_quantize(kind, rng.standard_normal((n, dim)) * 0.2) for _ in range(count)]
    packed = np.concatenate(fields, axis=1)
    wide = np.zeros((n, packed.shape[1] + pad), np.uint8)
    wide[:, : packed.shape[1]] = packed
    return wide[:, : packed.shape[1]], [_values(kind, f) for f in fields]


def _ffn(fields, x, gated, bias, rows):
    x = x.astype(np.float64)
    if gated:
        g, u, down = (f[rows] for f in fields)
        g, u = g @ x, u @ x
        h = g / (1 + np.exp(-g)) * u
    else:
        u, down = (f[rows] for f in fields)
        h = np.maximum(u @ x + (0 if bias is None else bias[rows].astype(np.float64)), 0)
    return h @ down


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_matches_gguf(kind, path):
    rng = np.random.default_rng(1)
    blocks = _quantize(kind, rng.standard_normal((6, 576)))
    got = native.q_dequantize(kind, blocks.ravel(), 6 * 576)
    np.testing.assert_allclose(got, _values(kind, blocks).ravel(), rtol=1e-6, atol=0)
    assert native.q_dequantize(kind, np.zeros(0, np.uint8), 0).shape == (0,)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,cols", [(1, 32), (13, 576), (48, 4096), (1024, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_matvec_matches_float64(kind, rows, cols, threads, path):
    rng = np.random.default_rng(rows + cols)
    w = _quantize(kind, rng.standard_normal((rows, cols)))
    x = rng.standard_normal(cols).astype(np.float32)
    assert w.shape == (rows, cols // 32 * BLOCK_BYTES[kind])
    _close(native.q_matvec(kind, w, x, threads=threads), _values(kind, w) @ x.astype(np.float64))


def test_matvec_of_no_rows():
    y = native.q_matvec("q4_0", np.zeros((0, 36), np.uint8), np.ones(64, np.float32))
    assert y.shape == (0,) and y.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,dim", [(5, 64), (300, 576), (40, 4096)])
@pytest.mark.parametrize("gated", [False, True])
def test_bundle_ffn_matches_float64(kind, n, dim, gated, path):
    rng = np.random.default_rng(n * dim + gated)
    rows, fields = _bundles(kind, rng, n, dim, gated, pad=7)
    assert rows.shape[1] == (3 if gated else 2) * dim // 32 * BLOCK_BYTES[kind]
    x = rng.standard_normal(dim).astype(np.float32)
    bias = None if gated else (rng.standard_normal(n) * 0.3).astype(np.float32)
    every = np.arange(n)
    for threads in (1, 2):
        got = native.q_bundle_ffn(kind, rows, x, gated, bias=bias, threads=threads)
        _close(got, _ffn(fields, x, gated, bias, every))
    pick = rng.permutation(n)[: n // 2 + 1].astype(np.uint32)
    got = native.q_bundle_ffn(kind, rows, x, gated, bias=bias, pick=pick)
    _close(got, _ffn(fields, x, gated, bias, pick.astype(np.int64)))


def test_bundle_sizes_of_the_target_models():
    assert 3 * 576 // 32 * BLOCK_BYTES["q4_1"] == 1080  # SmolLM2, gated
    assert 2 * 4096 // 32 * BLOCK_BYTES["q4_0"] == 4608  # OPT-6.7B
    assert 2 * 4096 // 32 * BLOCK_BYTES["q8_0"] == 8704


def test_portable_switch_reports_the_path():
    before = native.q_set_portable(True)
    try:
        assert native.q_simd() == "portable"
        assert native.q_set_portable(False) is True
        assert native.q_simd() in ("avx2", "portable")
    finally:
        native.q_set_portable(before)


def _raises(match: str, fn, *args, **kw):
    with pytest.raises(InvalidArgumentError, match=match) as info:
        fn(*args, **kw)
    assert isinstance(info.value, ValueError)


def test_bad_arguments_raise_invalid_argument_errors():
    x = np.ones(64, np.float32)
    w = np.zeros((3, 36), np.uint8)
    _raises('unknown quantized type "q5_0"', native.q_matvec, "q5_0", w, x)
    _raises("not a whole number", native.q_matvec, "q4_0", w, np.ones(48, np.float32))
    _raises("rows of 36 bytes for x of 64 values .expected 40", native.q_matvec, "q4_1", w, x)
    _raises("C-contiguous", native.q_matvec, "q4_0", np.zeros((3, 72), np.uint8)[:, ::2], x)
    _raises("x must be one contiguous", native.q_matvec, "q4_0", w, np.ones(128, np.float32)[::2])

    rows = np.zeros((3, 72), np.uint8)
    _raises("cannot hold 3 fields", native.q_bundle_ffn, "q4_0", rows, x, True)
    _raises("picked bundle 3 of 3", native.q_bundle_ffn, "q4_0", rows, x, False, pick=np.array([0, 3], np.uint32))
    _raises("bias Some.2.", native.q_bundle_ffn, "q4_0", rows, x, False, bias=np.zeros(2, np.float32))
    _raises(
        "gated true", native.q_bundle_ffn, "q4_0", np.zeros((3, 108), np.uint8), x, True, bias=np.zeros(3, np.float32)
    )
    _raises("unit column stride", native.q_bundle_ffn, "q4_0", np.zeros((3, 144), np.uint8)[:, ::2], x, False)
    _raises("not a whole number", native.q_bundle_ffn, "q8_0", rows, np.ones(40, np.float32), False)

    _raises("not 35", native.q_dequantize, "q4_0", np.zeros(35, np.uint8), 32)
    _raises("not a whole number", native.q_dequantize, "q8_0", np.zeros(34, np.uint8), 33)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(sorted(KINDS)),
    n=st.integers(0, 20),
    blocks=st.integers(1, 6),
    gated=st.booleans(),
    portable=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_bundle_ffn_property(kind, n, blocks, gated, portable, seed):
    rng = np.random.default_rng(seed)
    dim = 32 * blocks
    rows, fields = _bundles(kind, rng, n, dim, gated, pad=int(rng.integers(0, 5)))
    x = rng.standard_normal(dim).astype(np.float32)
    bias = None if gated else (rng.standard_normal(n) * 0.3).astype(np.float32)
    before = native.q_set_portable(portable)
    try:
        got = native.q_bundle_ffn(kind, rows, x, gated, bias=bias)
    finally:
        native.q_set_portable(before)
    if n == 0:
        assert not got.any()
    else:
        _close(got, _ffn(fields, x, gated, bias, np.arange(n)))


def test_dequantize_checks_the_length_before_allocating():
    """A value count far beyond the blocks given is an error naming both, not an aborted allocation."""
    with pytest.raises(ValueError, match="values take"):
        native.q_dequantize("q8_0", np.zeros(34, dtype=np.uint8), 1 << 60)
