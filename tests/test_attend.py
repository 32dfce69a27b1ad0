"""Decode attention over the KV cache as stored (layers.decode_attention -> _native.attend_one):
equal to the float32 path (causal_attention over the upcast cache) for float16 and float32
caches, grouped-query shapes, partly filled caches and two threads; bad shapes rejected."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash._native import attend_one
from llmflash.models.layers import causal_attention, decode_attention
from llmflash.threads import decode_threads


@settings(max_examples=80, deadline=None)
@given(
    kv_heads=st.integers(1, 6),
    group=st.integers(1, 4),
    hd=st.integers(1, 80),
    capacity=st.integers(1, 400),
    fill=st.floats(0, 1),
    dtype=st.sampled_from([torch.float16, torch.float32]),
    threads=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_decode_attention_equals_the_float32_path(kv_heads, group, hd, capacity, fill, dtype, threads, seed):
    g = torch.Generator().manual_seed(seed)
    length = 1 + int((capacity - 1) * fill)
    q = torch.randn(kv_heads * group, 1, hd, generator=g) * 2
    k = (torch.randn(kv_heads, capacity, hd, generator=g) * 2).to(dtype)
    v = torch.randn(kv_heads, capacity, hd, generator=g).to(dtype)
    want = causal_attention(q, k[:, :length].float(), v[:, :length].float(), length - 1)
    with decode_threads(threads):  # inside: the KV heads split between threads
        got = decode_attention(q, k, v, length)
    assert got.dtype == torch.float32 and got.shape == want.shape == (1, kv_heads * group * hd)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_positions_past_the_length_are_not_read():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(4, 1, 16, generator=g)
    k, v = torch.randn(2, 10, 16, generator=g), torch.randn(2, 10, 16, generator=g)
    a = decode_attention(q, k, v, 6)
    k[:, 6:], v[:, 6:] = float("nan"), 1e30
    assert torch.equal(a, decode_attention(q, k, v, 6))


def test_other_dtypes_and_layouts_take_the_torch_path():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 1, 8, generator=g)
    k, v = torch.randn(3, 12, 8, generator=g), torch.randn(3, 12, 8, generator=g)
    want = decode_attention(q, k, v, 12)
    torch.testing.assert_close(decode_attention(q, k.bfloat16(), v.bfloat16(), 12), want, rtol=0.05, atol=0.05)
    strided_k, strided_v = torch.randn(3, 12, 16)[:, :, ::2].copy_(k), torch.randn(3, 12, 16)[:, :, ::2].copy_(v)
    assert not strided_k.is_contiguous()
    torch.testing.assert_close(decode_attention(q, strided_k, strided_v, 12), want)


def test_native_rejects_bad_shapes():
    q = np.zeros((4, 8), dtype=np.float32)
    kv = np.zeros((2, 5, 8), dtype=np.float32)
    assert attend_one(q, kv, kv, 5, 0.5).shape == (32,)
    with pytest.raises(ValueError, match="5 positions"):
        attend_one(q, kv, kv, 6, 0.5)
    with pytest.raises(ValueError, match="0 of 5 positions"):
        attend_one(q, kv, kv, 0, 0.5)
    with pytest.raises(ValueError, match="3 query and 2 KV heads"):
        attend_one(q[:3], kv, kv, 5, 0.5)
    with pytest.raises(ValueError, match="do not agree"):
        attend_one(q, kv, kv[:, :4], 4, 0.5)
    with pytest.raises(ValueError, match="same dtype"):
        attend_one(q, kv.astype(np.float16).view(np.int16), kv, 5, 0.5)
    with pytest.raises(ValueError, match="C-contiguous"):
        attend_one(q, kv[:, ::2], kv[:, ::2], 3, 0.5)
