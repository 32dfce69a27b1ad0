"""The quantized bundle layout, as a property (hypothesis): for any model shape and block kind,
each bundle holds its neuron's gate/up rows as exactly the blocks gguf.quants makes and, with the
layer's resident scales, its down column as gguf.quants rounds down_proj along its rows (padded
to whole 32-neuron blocks); any neuron subset read through a NeuronCache equals those rows of the
region, and the FFN over them equals a float FFN written out here over the same rounded values."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf_builders import GGML, KINDS, rt, rt_padded
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmflash.models.config import ModelConfig
from llmflash.models.quant import BLOCK_BYTES
from llmflash.store import Store


# -- property: the quantized bundle layout ---------------------------------------------------------
@st.composite
def q_layouts(draw):
    gated = draw(st.booleans())
    head_dim = draw(st.sampled_from([16, 32]))
    dim = 32 * draw(st.integers(1, 3))
    n_layers = draw(st.integers(1, 2))
    config = ModelConfig(
        arch="llama" if gated else "opt",
        vocab_size=16,
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        n_heads=[dim // head_dim] * n_layers,
        n_kv_heads=[dim // head_dim] * n_layers,
        ffn_dims=[draw(st.integers(1, 200)) for _ in range(n_layers)],
        gated=gated,
        act="silu" if gated else "relu",
        ffn_bias=not gated and draw(st.booleans()),
        norm="rms" if gated else "layer",
    )
    kind = draw(st.sampled_from(KINDS))
    layer = draw(st.integers(0, n_layers - 1))
    subset = draw(st.sets(st.integers(0, config.ffn_dims[layer] - 1), min_size=1))
    return config, kind, layer, sorted(subset), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(q_layouts())
def test_quantized_bundles_property(layout):
    """Any layout and kind: each bundle is its gate/up rows' blocks exactly as gguf.quants makes
    them, its down column gguf.quants' rounding of down_proj along its rows; any neuron subset
    read through a NeuronCache (per-bundle CRCs on)
    is those rows of the whole region, and the FFN over them picked in place (one token) or
    gathered (a prompt) equals the float FFN over the same rounded values."""
    from llmflash.convert.writer import StoreWriter
    from llmflash.io import NeuronCache, Reader, as_tensor
    from llmflash.store import expected_resident
    from llmflash.strategies.base import rows_ffn

    config, kind, layer, subset, seed = layout
    g = torch.Generator().manual_seed(seed)
    D = config.dim
    layers = [
        {
            "up": torch.randn(n, D, generator=g),
            "down": torch.randn(D, n, generator=g),
            "gate": torch.randn(n, D, generator=g) if config.gated else None,
        }
        for n in config.ffn_dims
    ]
    resident = {k: torch.randn(s, generator=g) for k, s in expected_resident(config).items()}
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "s.llmflash"
        with StoreWriter(dst, config, kind) as w:
            w.write_resident(resident)
            for i, L in enumerate(layers):
                w.write_layer(i, **L)
        store = Store(dst)
        L = store.layers[layer]
        rb = D // 32 * BLOCK_BYTES[kind]
        whole = store.read_layer(layer)  # (n, bundle_bytes) uint8
        src = layers[layer]
        fields = {"gate": src["gate"], "up": src["up"]}
        for f, name in enumerate(["gate", "up"] if config.gated else ["up"]):
            want = gguf.quants.quantize(np.ascontiguousarray(fields[name].numpy()), GGML[kind])
            assert np.array_equal(whole[:, f * rb : (f + 1) * rb].numpy(), want)
        q = store.q_bundles(layer)
        down = rt_padded(src["down"], kind).t()  # (n, D): row j is neuron j's down column
        assert torch.allclose(q.dequantize(whole)[:, -1], down, rtol=1e-6, atol=0)
        ids = np.asarray(subset, dtype=np.uint32)
        cache = NeuronCache(Reader(store.ffn_path, concurrency=4), L.offset, L.n_neurons, L.bundle_bytes, len(ids), 1)
        cache.set_bundle_crcs(store.bundle_crcs(layer))
        cache.admit(ids, 0)
        slots = as_tensor(cache.slots, torch.uint8)[: len(ids) * L.bundle_bytes].view(len(ids), -1)
        got_ids = np.asarray(cache.slot_neurons())[: len(ids)]
        assert sorted(got_ids.tolist()) == subset
        assert torch.equal(slots, whole[torch.from_numpy(got_ids.astype(np.int64))])
        bias = store.up_biases()[layer]
        deq = {name: rt(t, kind) for name, t in fields.items() if t is not None}
        deq["down"] = down
        sel = torch.from_numpy(got_ids.astype(np.int64))
        b = None if bias is None else bias[sel]
        for T in (1, 17):
            x = torch.randn(T, D, generator=g)
            args = (x, deq["up"][sel], deq["down"][sel], deq["gate"][sel] if config.gated else None, b)
            ref = float_ffn(*args)
            out = rows_ffn(x, slots, config, b, q=q)
            assert (out - ref).abs().max().item() <= ffn_tolerance(*args, ref)
        pick = np.arange(0, len(ids), 2, dtype=np.uint32)  # every other cached row, in place
        x = torch.randn(1, D, generator=g)
        p = torch.from_numpy(pick.astype(np.int64))
        args = (
            x,
            deq["up"][sel][p],
            deq["down"][sel][p],
            deq["gate"][sel][p] if config.gated else None,
            None if b is None else b[p],
        )
        ref = float_ffn(*args)
        out = rows_ffn(x, slots, config, b, pick=pick, q=q)
        assert (out - ref).abs().max().item() <= ffn_tolerance(*args, ref)


def float_ffn(x, up, down, gate, bias):
    """The FFN over float rows, written out here (float64): silu(x gate^T) * (x up^T) for gated
    models, relu(x up^T + bias) for plain ones, times the down columns (rows of `down`)."""
    x = x.double()
    u = x @ up.double().T + (0.0 if bias is None else bias.double())
    h = torch.nn.functional.silu(x @ gate.double().T) * u if gate is not None else torch.relu(u)
    return (h @ down.double()).float()


def ffn_tolerance(x, up, down, gate, bias, ref) -> float:
    """1e-4 of the larger of 1, max |ref| and the size of the largest output's terms,
    sum_i m_i |down_i| with m_i the size of h_i's dot products' terms: the kernels round x to
    int16 per block (rust/quant.rs, Xq), an error that scales with the terms, not with a sum
    that cancels."""
    x, up, down = x.double(), up.double(), down.double()
    ax = x.abs()
    u = x @ up.T + (0.0 if bias is None else bias.double())
    mu = ax @ up.abs().T + (0.0 if bias is None else bias.double().abs())
    if gate is not None:
        g = x @ gate.double().T
        s = torch.nn.functional.silu(g)
        m = s.abs() * mu + 1.1 * u.abs() * (ax @ gate.double().abs().T)
    else:
        m = mu
    terms = (m @ down.abs()).max().item() if m.numel() else 0.0
    return 1e-4 * max(1.0, ref.abs().max().item(), terms)
