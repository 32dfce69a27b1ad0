"""Property: whatever the layer shapes and dtype, a neuron written by StoreWriter comes back from
Store.read_layer + split_bundles with exactly its gate row, up row and down column, and its fc1
bias (OPT) from Store.up_biases; a bundle is exactly its 2 or 3 rows (no bias inside); every
layer region starts on a 4 KiB boundary; and the bundle-view FFN equals the dense FFN."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmflash.convert.writer import StoreWriter
from llmflash.models.config import ModelConfig
from llmflash.store import ALIGN, Store, expected_resident, split_bundles
from llmflash.strategies.base import bundle_ffn
from llmflash.strategies.dense import DenseFFN

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@st.composite
def layouts(draw):
    gated = draw(st.booleans())
    bias = False if gated else draw(st.booleans())  # fc1 bias: OPT-style, plain FFN only
    n_layers = draw(st.integers(1, 3))
    head_dim = draw(st.sampled_from([2, 4, 8]))
    dim = head_dim * draw(st.integers(1, 6))
    ffn = [draw(st.integers(1, 300)) for _ in range(n_layers)]
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    config = ModelConfig(
        arch="llama" if gated else "opt",
        vocab_size=16,
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        n_heads=[dim // head_dim] * n_layers,
        n_kv_heads=[dim // head_dim] * n_layers,
        ffn_dims=ffn,
        gated=gated,
        act="silu" if gated else "relu",
        ffn_bias=bias,
        norm="rms" if gated else "layer",
    )
    return config, dtype, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layouts())
def test_every_neuron_round_trips(layout):
    config, dtype, seed = layout
    g = torch.Generator().manual_seed(seed)
    t = DTYPES[dtype]
    layers = []
    for n in config.ffn_dims:
        d = config.dim
        layers.append(
            {
                "up": torch.randn(n, d, generator=g).to(t),
                "down": torch.randn(d, n, generator=g).to(t),
                "gate": torch.randn(n, d, generator=g).to(t) if config.gated else None,
            }
        )
    resident = {k: torch.randn(s, generator=g).to(t) for k, s in expected_resident(config).items()}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "s.llmflash"
        with StoreWriter(dst, config, dtype) as w:
            w.write_resident(resident)
            for i, L in enumerate(layers):
                w.write_layer(i, **L)
        store = Store(dst)
        assert store.dtype == t
        biases = store.up_biases()
        for i, L in enumerate(layers):
            assert store.layers[i].bundle_bytes == (3 if config.gated else 2) * config.dim * t.itemsize
            b = biases[i]
            if config.ffn_bias:
                assert b is not None and b.dtype == torch.float32
                assert torch.equal(b, resident[f"layers.{i}.ffn.up_bias"].float())
            else:
                assert b is None
            region = store.layers[i]
            assert region.offset % ALIGN == 0 and region.region_bytes % ALIGN == 0
            bundles = store.read_layer(i)
            assert bundles.shape == (config.ffn_dims[i], config.bundle_values) and bundles.dtype == t
            parts = split_bundles(bundles, config)
            for j in {0, config.ffn_dims[i] // 2, config.ffn_dims[i] - 1}:
                assert torch.equal(parts["up"][j], L["up"][j])
                assert torch.equal(parts["down"][j], L["down"][:, j])
                if config.gated:
                    assert torch.equal(parts["gate"][j], L["gate"][j])
            assert torch.equal(parts["up"], L["up"]) and torch.equal(parts["down"], L["down"].t())
            # The FFN computed on strided bundle views equals the dense strategy's.
            x = torch.randn(3, config.dim, generator=g).to(t)
            dense = DenseFFN(store)(i, x).float()
            views = bundle_ffn(x, parts["up"], parts["down"], parts.get("gate"), b, config.act).float()
            assert torch.allclose(views, dense, rtol=2e-2, atol=2e-2 * (1 + dense.abs().max().item()))
        assert store.ffn_path.stat().st_size == store.layers[-1].offset + store.layers[-1].region_bytes
