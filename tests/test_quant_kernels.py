"""The quantized decode kernels (rust/quant.rs, rust/quant/bundle.rs) against an independent
reference: blocks made and decoded by the `gguf` package (gguf.quants), the bundle layout built
here from down_proj's blocks, products in float64 numpy. Every case runs on
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


def _close(got: np.ndarray, want: np.ndarray, tol: float = 1e-4, terms: float = 0.0) -> None:
    """got within tol of the larger of max |want| and `terms`, the size of the largest output's
    terms (the kernels round x to int16 per block, rust/quant.rs Xq: their error scales with the
    terms, not with a sum that cancels)."""
    scale = max(float(np.abs(want).max(initial=0.0)), terms, 1e-6)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale)


def _down_fields(kind: str, blocks: np.ndarray, dim: int, groups: int):
    """down_proj's blocks along its rows (dim, groups * block bytes) -> each neuron's down field
    (raw integers along the model dimension: int8, or nibbles with row k low and row k + 16 high
    in each 32-row chunk) and the scales (groups, dim) float16 bits (and minimums for q4_1)."""
    b = blocks.reshape(dim, groups, BLOCK_BYTES[kind])
    d = np.ascontiguousarray(b[:, :, :2]).view(np.uint16)[:, :, 0].T.copy()
    m = np.ascontiguousarray(b[:, :, 2:4]).view(np.uint16)[:, :, 0].T.copy() if kind == "q4_1" else None
    qs = b[:, :, 4 if kind == "q4_1" else 2 :]
    fields = []
    for j in range(groups * 32):
        g, k = divmod(j, 32)
        if kind == "q8_0":
            fields.append(qs[:, g, k].copy())  # (dim,) int8 bytes
            continue
        col = (qs[:, g, k] & 15) if k < 16 else (qs[:, g, k - 16] >> 4)  # (dim,) nibbles
        c = col.reshape(dim // 32, 32)
        fields.append((c[:, :16] | (c[:, 16:] << 4)).reshape(-1).astype(np.uint8))
    return fields, d, m


def _bundles(kind: str, rng, n: int, dim: int, gated: bool, pad: int = 0):
    """n bundles (rust/quant/bundle.rs: [gate,] up blocks, down integers, u32 group) of random
    weights quantized by gguf.quants, in shuffled order, each row followed by `pad` spare bytes
    (an (n, bundle bytes) view of a wider array); the down scales (d, m); and the fields'
    float64 values in the rows' order (gguf.quants.dequantize)."""
    rows_before = 2 if gated else 1
    size = rows_before * dim // 32 * BLOCK_BYTES[kind] + (dim if kind == "q8_0" else dim // 2) + 4
    groups = max(1, -(-n // 32))
    if n == 0:  # gguf.quants cannot quantize no rows
        no = np.zeros((1, dim), np.uint16)
        return np.zeros((0, size), np.uint8), no, no if kind == "q4_1" else None, []
    rowq = [_quantize(kind, rng.standard_normal((n, dim)) * 0.2) for _ in range(rows_before)]
    down = np.zeros((dim, groups * 32))
    down[:, :n] = rng.standard_normal((dim, n)) * 0.2
    dblocks = _quantize(kind, down)
    dfields, d, m = _down_fields(kind, dblocks, dim, groups)
    order = rng.permutation(n)
    wide = np.zeros((n, size + pad), np.uint8)
    for r, j in enumerate(order):
        group = np.array([j // 32], "<u4").view(np.uint8)
        wide[r, :size] = np.concatenate([q[j] for q in rowq] + [dfields[j], group])
    values = [_values(kind, q)[order] for q in rowq] + [_values(kind, dblocks).reshape(dim, -1).T[order]]
    return wide[:, :size], d, m, values


def _ffn_terms(fields, x, gated, bias, rows):
    """The FFN in float64 and the size of its largest output's terms: sum_i m_i |down_i|, m_i the
    size of h_i's dot products' terms (what rounding x scales with)."""
    x = x.astype(np.float64)
    ax = np.abs(x)
    if gated:
        gf, uf, down = (f[rows] for f in fields)
        g, u = gf @ x, uf @ x
        s = g / (1 + np.exp(-g))
        h = s * u
        m = np.abs(s) * (np.abs(uf) @ ax) + 1.1 * np.abs(u) * (np.abs(gf) @ ax)
    else:
        uf, down = (f[rows] for f in fields)
        b = 0 if bias is None else bias[rows].astype(np.float64)
        h = np.maximum(uf @ x + b, 0)
        m = np.abs(uf) @ ax + np.abs(b)
    return h @ down, float((m @ np.abs(down)).max(initial=0.0))


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
    vals = _values(kind, w)
    terms = float((np.abs(vals) @ np.abs(x.astype(np.float64))).max())
    _close(native.q_matvec(kind, w, x, threads=threads), vals @ x.astype(np.float64), terms=terms)


def test_matvec_of_no_rows():
    y = native.q_matvec("q4_0", np.zeros((0, 36), np.uint8), np.ones(64, np.float32))
    assert y.shape == (0,) and y.dtype == np.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,dim", [(5, 64), (300, 576), (40, 4096)])
@pytest.mark.parametrize("gated", [False, True])
def test_bundle_ffn_matches_float64(kind, n, dim, gated, path):
    rng = np.random.default_rng(n * dim + gated)
    rows, d, m, fields = _bundles(kind, rng, n, dim, gated, pad=7)
    x = rng.standard_normal(dim).astype(np.float32)
    bias = None if gated else (rng.standard_normal(n) * 0.3).astype(np.float32)
    every = np.arange(n)
    for threads in (1, 2):
        got = native.q_bundle_ffn(kind, rows, x, gated, d, m, bias=bias, threads=threads)
        want, terms = _ffn_terms(fields, x, gated, bias, every)
        _close(got, want, terms=terms)
    pick = rng.permutation(n)[: n // 2 + 1].astype(np.uint32)
    got = native.q_bundle_ffn(kind, rows, x, gated, d, m, bias=bias, pick=pick)
    want, terms = _ffn_terms(fields, x, gated, bias, pick.astype(np.int64))
    _close(got, want, terms=terms)
    flat = native.q_bundle_dequantize(kind, rows, dim, gated, d, m).reshape(n, -1, dim)
    for f, want in enumerate(fields):
        np.testing.assert_allclose(flat[:, f], want, rtol=1e-6, atol=0)


def test_bundle_sizes_of_the_target_models():
    from llmflash.models.quant import bundle_bytes

    assert bundle_bytes("q4_1", 576, gated=True) == 2 * 360 + 288 + 4 == 1012  # SmolLM2
    assert bundle_bytes("q4_0", 4096, gated=False) == 2304 + 2048 + 4 == 4356  # OPT-6.7B
    assert bundle_bytes("q8_0", 4096, gated=False) == 4352 + 4096 + 4 == 8452


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

    rows = np.zeros((3, 72), np.uint8)  # q4_0 plain bundles of 64 values: 36 + 32 + 4 bytes
    d = np.zeros((2, 64), np.uint16)
    ffn = native.q_bundle_ffn
    _raises("cannot hold a bundle", ffn, "q4_0", rows, x, True, d)
    _raises("picked bundle 3 of 3", ffn, "q4_0", rows, x, False, d, pick=np.array([0, 3], np.uint32))
    _raises("bias Some.2.", ffn, "q4_0", rows, x, False, d, bias=np.zeros(2, np.float32))
    _raises("gated true", ffn, "q4_0", np.zeros((3, 108), np.uint8), x, True, d, bias=np.zeros(3, np.float32))
    _raises("unit column stride", ffn, "q4_0", np.zeros((3, 144), np.uint8)[:, ::2], x, False, d)
    _raises("not a whole number", ffn, "q8_0", rows, np.ones(40, np.float32), False, d)
    _raises("down_scale has rows of 32", ffn, "q4_0", rows, x, False, np.zeros((2, 32), np.uint16))
    _raises("down minimums Some", ffn, "q4_0", rows, x, False, d, d)
    _raises("down minimums None", ffn, "q4_1", np.zeros((3, 76), np.uint8), x, False, d)
    far = rows.copy()
    far[1, -4:] = np.array([2], "<u4").view(np.uint8)  # group 2 of 2
    _raises("bundle 1 names down group 2, but the layer has 2", ffn, "q4_0", far, x, False, d)
    _raises("bundle 1 names down group 2", native.q_bundle_dequantize, "q4_0", far, 64, False, d)

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
    rows, d, m, fields = _bundles(kind, rng, n, dim, gated, pad=int(rng.integers(0, 5)))
    x = rng.standard_normal(dim).astype(np.float32)
    bias = None if gated else (rng.standard_normal(n) * 0.3).astype(np.float32)
    before = native.q_set_portable(portable)
    try:
        got = native.q_bundle_ffn(kind, rows, x, gated, d, m, bias=bias)
    finally:
        native.q_set_portable(before)
    if n == 0:
        assert not got.any()
    else:
        want, terms = _ffn_terms(fields, x, gated, bias, np.arange(n))
        _close(got, want, terms=terms)


def test_dequantize_checks_the_length_before_allocating():
    """A value count far beyond the blocks given is an error naming both, not an aborted allocation."""
    with pytest.raises(ValueError, match="values take"):
        native.q_dequantize("q8_0", np.zeros(34, dtype=np.uint8), 1 << 60)
