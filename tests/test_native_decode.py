"""Quantized decode's native pieces: each layer's attention half in one call
(models/native_decode.py, llmflash._native.QAttention) against the Python layer it replaces, and
dense's FFN as two quantized matrices (down_proj's blocks rebuilt from the bundles,
models/quant.join_down) against gguf.quants' own blocks and transformers."""

from __future__ import annotations

import copy
import warnings

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer_json
from gguf_builders import GGML, KINDS, rt, rt_padded
from hypothesis import given, settings
from hypothesis import strategies as st
from openelm_builders import V as ELM_V
from openelm_builders import hf_config, random_weights, save_openelm

from llmflash._native import QAttention, QDecoder
from llmflash.convert.hf import convert_hf
from llmflash.errors import InvalidArgumentError
from llmflash.models.quant import QTensor, join_down, split_down
from llmflash.strategies.dense import load_dense

# The native and Python layers agree to the products' rounding of x to int16 per 32-value block
# (rust/quant.rs, Xq): the two paths' float32 norms differ in their last bits, which can move a
# rounded value by one step, 1/65534 of its block's largest (about 1e-4 of the logits here);
# a wrong RoPE, cache slot or head grouping is off by far more.
SAME = 1e-3


def convert_quiet(src, dst, kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer.json"
        return convert_hf(src, dst, dtype=kind, **kw)


def decode(model, ids: torch.Tensor) -> torch.Tensor:
    """Every position's logits, one token at a time through the KV cache."""
    cache = model.new_cache(len(ids))
    return torch.cat([model.forward(ids[t : t + 1], cache) for t in range(len(ids))])


def python_layers(model, ids: torch.Tensor) -> torch.Tensor:
    """decode() with the native attention switched off: the torch layer path."""
    saved, model.native_layers = model.native_layers, None
    try:
        return decode(model, ids)
    finally:
        model.native_layers = saved


def ids(seed: int, n: int = 12, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["llama_gqa", "llama_bias"])
def test_native_attention_equals_the_python_layer(variant, kind, make_hf, tmp_path):
    """Llama with grouped-query attention, and with attention biases (q, k, v, o): one native
    call per layer gives the torch layers' logits (to SAME), token after token (the
    KV cache it writes is read back by the next tokens)."""
    kw = {"attention_bias": True} if variant == "llama_bias" else {}
    dst = convert_quiet(make_hf(variant, "llama", **kw).path, tmp_path / "m.llmflash", kind)
    model, _ = load_dense(dst)
    assert model.native_layers is not None and len(model.native_layers) == model.config.n_layers
    x = ids(1)
    ours, ref = decode(model, x), python_layers(model, x)
    assert (ours - ref).abs().max().item() <= SAME * max(1.0, ref.abs().max().item())


def test_native_attention_openelm(tmp_path):
    """OpenELM: per-layer head counts, q/k norms before RoPE, tied embeddings."""
    src = save_openelm(tmp_path / "hf", hf_config(), random_weights(seed=3))
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json(ELM_V))
    dst = convert_quiet(src, tmp_path / "elm.llmflash", "q8_0", tokenizer=tok)
    model, _ = load_dense(dst)
    assert model.native_layers is not None
    assert len({L.n_heads for L in model.layers}) > 1
    x = ids(2, vocab=ELM_V)
    ours, ref = decode(model, x), python_layers(model, x)
    assert (ours - ref).abs().max().item() <= SAME * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS)
def test_whole_token_decoder_equals_the_per_layer_calls(kind, make_hf, tmp_path):
    """dense on a quantized SwiGLU store runs a token in one QDecoder call; the same model with
    the decoder off (one QAttention call a layer, the FFN from Python) gives the same logits; a
    flash-style FFN without whole matrices gets no decoder, and swapping the FFN object drops it."""
    dst = convert_quiet(make_hf("llama_gqa", "llama").path, tmp_path / "m.llmflash", kind)
    model, _ = load_dense(dst)
    assert model.native_decoder is not None
    x = ids(4)
    ours = decode(model, x)
    ffn = model.ffn
    model._decoder = (ffn, model.native_layers, None)  # the per-layer path
    ref = decode(model, x)
    assert (ours - ref).abs().max().item() <= SAME * max(1.0, ref.abs().max().item())

    class Wrapped:  # an FFN object of another kind: no native matrices
        def __call__(self, i, h):
            return ffn(i, h)

    model.ffn = Wrapped()
    assert model.native_decoder is None
    wrapped = decode(model, x)
    assert (wrapped - ref).abs().max().item() <= SAME * max(1.0, ref.abs().max().item())


def _random_q40(rng, rows: int, cols: int) -> np.ndarray:
    return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.2).astype(np.float32), GGML["q4_0"])


def test_qdecoder_is_the_attention_step_then_the_swiglu_ffn():
    """QDecoder.run on random q4_0 weights equals, layer by layer, QAttention.step followed by
    the SwiGLU FFN written out here with q_matvec (gate rows first, then up rows): the same
    kernels, so equal to float32 rounding; the keys and values land in the caches."""
    from llmflash._native import q_matvec

    rng = np.random.default_rng(3)
    d, hd, heads, kv, n, cap = 64, 16, 4, 2, 32, 4
    norm = lambda: (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)  # noqa: E731
    atts, w1s, w2s = [], [], []
    for _ in range(2):
        mats = [_random_q40(rng, r, c) for r, c in ((heads * hd, d), (kv * hd, d), (kv * hd, d), (d, heads * hd))]
        atts.append(QAttention("q4_0", *mats, norm(), norm(), heads, kv, hd, 1e-5))
        w1s.append(_random_q40(rng, 2 * n, d))
        w2s.append(_random_q40(rng, d, n))
    dec = QDecoder("q4_0", atts, w1s, w2s)
    x0 = rng.standard_normal(d).astype(np.float32)
    cos, sin = np.cos(np.arange(hd) * 0.3, dtype=np.float32), np.sin(np.arange(hd) * 0.3, dtype=np.float32)
    caches = [np.zeros((kv, cap, hd), dtype=np.float32) for _ in range(8)]
    x = x0.copy()
    dec.run(x, 1, caches[:2], caches[2:4], cos=cos, sin=sin)
    ref = x0.copy()
    for i in range(2):
        h = atts[i].step(ref, 1, caches[4 + i], caches[6 + i], cos=cos, sin=sin)
        gu = q_matvec("q4_0", w1s[i], h, threads=1)
        g, u = gu[:n].astype(np.float64), gu[n:].astype(np.float64)
        ref += q_matvec("q4_0", w2s[i], (g / (1 + np.exp(-g)) * u).astype(np.float32), threads=1)
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    for a, b in zip(caches[:4], caches[4:]):
        assert np.abs(a[:, 1]).max() > 0 and np.array_equal(a[:, [0, 2, 3]], np.zeros_like(a[:, [0, 2, 3]]))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())


def test_qdecoder_refuses_bad_shapes():
    d, hd, heads, kv, n = 64, 16, 4, 2, 32
    blocks = lambda rows, cols: np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # noqa: E731
    ones = np.ones(d, dtype=np.float32)
    mats = [blocks(heads * hd, d), blocks(kv * hd, d), blocks(kv * hd, d), blocks(d, heads * hd)]
    att = QAttention("q4_0", *mats, ones, ones, heads, kv, hd, 1e-5)
    dec = QDecoder("q4_0", [att, att], [blocks(2 * n, d)] * 2, [blocks(d, n)] * 2)
    x = np.ones(d, dtype=np.float32)
    caches = [np.zeros((kv, 4, hd), dtype=np.float32) for _ in range(4)]
    dec.run(x, 0, caches[:2], caches[2:])
    assert np.array_equal(x, ones)  # zero weights (d = 0 in every block): nothing added
    with pytest.raises(InvalidArgumentError, match="2 attention layers, 1 w1"):
        QDecoder("q4_0", [att, att], [blocks(2 * n, d)], [blocks(d, n)] * 2)
    with pytest.raises(InvalidArgumentError, match="not gate and up rows"):
        QDecoder("q4_0", [att], [blocks(2 * n + 1, d)], [blocks(d, n)])
    with pytest.raises(InvalidArgumentError, match="layer 0: FFN layer of 32 neurons"):
        QDecoder("q4_0", [att], [blocks(2 * n, d)], [blocks(d, 2 * n)])
    with pytest.raises(InvalidArgumentError, match="1 key and 2 value caches"):
        dec.run(x, 0, caches[:1], caches[2:])
    with pytest.raises(InvalidArgumentError, match="position 4"):
        dec.run(x, 4, caches[:2], caches[2:])
    with pytest.raises(InvalidArgumentError, match=r"layer 1's keys has shape \[1, 4, 32\]"):
        flat = np.zeros((1, 4, kv * hd), dtype=np.float32)  # the right length, the wrong layout
        dec.run(x, 0, [caches[0], flat], [caches[2], flat.copy()])
    with pytest.raises(InvalidArgumentError, match="positive even head size"):
        QAttention("q4_0", *mats, ones, ones, heads, kv, 0, 1e-5)
    with pytest.raises(InvalidArgumentError, match="attn_norm is also an array this call writes"):
        att2 = QAttention("q4_0", *mats, x, ones, heads, kv, hd, 1e-5)
        att2.step(x, 0, caches[0], caches[2])
    bad = QDecoder("q4_0", [att, att], [blocks(2 * n, d)] * 2, [blocks(d, n)] * 2)
    x[:] = 2.0
    with pytest.raises(InvalidArgumentError, match="layer 1"):
        bad.run(x, 0, [caches[0], np.zeros((kv, 4, hd + 2), np.float32)], [caches[2], caches[3]])
    assert np.array_equal(x, 2 * ones)  # checked before layer 0 changed anything


def test_opt_and_float_stores_keep_the_python_layer(make_hf, tmp_path):
    hf = make_hf("opt_pre_ln", "opt")
    assert load_dense(convert_quiet(hf.path, tmp_path / "q.llmflash", "q4_0"))[0].native_layers is None  # LayerNorm
    llama = make_hf("llama_gqa", "llama").path
    assert load_dense(convert_quiet(llama, tmp_path / "f.llmflash", "float32"))[0].native_layers is None


def test_qattention_refuses_bad_shapes():
    d, hd, heads, kv = 64, 16, 4, 2
    blocks = lambda rows, cols: np.zeros((rows, cols // 32 * 18), dtype=np.uint8)  # noqa: E731
    ones = np.ones(d, dtype=np.float32)
    args = [blocks(heads * hd, d), blocks(kv * hd, d), blocks(kv * hd, d), blocks(d, heads * hd), ones, ones]
    att = QAttention("q4_0", *args, heads, kv, hd, 1e-5)
    cache = np.zeros((kv, 4, hd), dtype=np.float32)
    h = att.step(np.ones(d, dtype=np.float32), 0, cache, cache.copy())
    assert h.shape == (d,) and np.isfinite(h).all()
    with pytest.raises(InvalidArgumentError, match="o has"):
        QAttention("q4_0", *args[:3], blocks(d - 1, heads * hd), *args[4:], heads, kv, hd, 1e-5)
    with pytest.raises(InvalidArgumentError, match="whole groups"):
        QAttention("q4_0", *args, heads, 3, hd, 1e-5)
    with pytest.raises(InvalidArgumentError, match="q5_0"):
        QAttention("q5_0", *args, heads, kv, hd, 1e-5)
    with pytest.raises(InvalidArgumentError, match="position 4"):
        att.step(np.ones(d, dtype=np.float32), 4, cache, cache.copy())
    with pytest.raises(InvalidArgumentError, match="differ in shape"):
        att.step(np.ones(d, dtype=np.float32), 0, cache, np.zeros((kv, 5, hd), dtype=np.float32))
    with pytest.raises(InvalidArgumentError, match="cos and sin"):
        att.step(np.ones(d, dtype=np.float32), 0, cache, cache.copy(), cos=np.ones(hd, dtype=np.float32))


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(KINDS), dim=st.sampled_from([32, 64, 96]), groups=st.integers(1, 4), seed=st.integers(0, 2**31)
)
def test_join_down_rebuilds_gguf_blocks(kind, dim, groups, seed):
    """gguf.quants' blocks of a (dim, 32 groups) down_proj, split into bundle fields and scales
    and joined again: the same bytes."""
    w = np.random.default_rng(seed).standard_normal((dim, 32 * groups)).astype(np.float32)
    blocks = gguf.quants.quantize(w, GGML[kind])
    fields, d, m = split_down(kind, blocks, dim, groups)
    assert np.array_equal(join_down(kind, fields, d, m), blocks)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_ffn_matrices_match_gguf_and_transformers(kind, make_hf, tmp_path):
    """dense holds gate/up and down as QTensors whose dequantized values are gguf.quants' round
    trip of the weights, and a width that is not whole groups of 32 (80 neurons) falls back to the
    bundle kernel; both give the quantized reference's logits."""
    for name, width in (("llama_gqa", 96), ("llama_ffn80", 80)):
        hf = make_hf(name, "llama", intermediate_size=width)
        model, store = load_dense(convert_quiet(hf.path, tmp_path / f"{name}-{kind}.llmflash", kind))
        ffn = model.ffn
        mlp = hf.model.model.layers[0].mlp
        if width % 32 == 0:
            assert isinstance(ffn.w2[0], QTensor) and ffn.w2[0].shape == (64, width)
            down = ffn.w2[0].dequantize()
            assert torch.equal(down, rt(mlp.down_proj.weight.detach(), kind))
            gate_up = ffn.w1[0].dequantize()
            assert torch.equal(gate_up[:width], rt(mlp.gate_proj.weight.detach(), kind))
            assert torch.equal(gate_up[width:], rt(mlp.up_proj.weight.detach(), kind))
        else:
            assert ffn.w2[0] is None and ffn.rows[0].shape[0] == width
        ref = copy.deepcopy(hf.model).float()
        with torch.no_grad():
            for pname, p in ref.named_parameters():
                if p.dim() == 2:
                    p.copy_(rt_padded(p, kind) if pname.endswith("down_proj.weight") else rt(p, kind))
            x = ids(4, n=20)
            want = ref(x[None]).logits[0]
        got = decode(model, x)
        assert (got - want).abs().max().item() <= 1e-3 * max(1.0, want.abs().max().item())
