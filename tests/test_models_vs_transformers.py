"""transformers is the oracle: tiny random Llama and OPT models, saved with save_pretrained,
converted, run by our plain-PyTorch transformer with the dense FFN. Logits must match to float32
tolerance, over a prompt and over greedy steps with our KV cache against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from llmflash.models.transformer import ContextLengthError, greedy
from llmflash.strategies.dense import load_dense

# name -> (kind, config overrides). Every variant the converter maps differently.
VARIANTS = {
    "llama_gqa": ("llama", {}),
    "llama_tied_bias_headdim": ("llama", dict(tie_word_embeddings=True, attention_bias=True, head_dim=32)),
    "llama3_rope": (
        "llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 50000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            num_key_value_heads=1,
        ),
    ),
    "llama_linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})),
    "opt_pre_ln": ("opt", {}),
    "opt_proj": ("opt", dict(word_embed_proj_dim=32)),
    "opt_post_ln": ("opt", dict(do_layer_norm_before=False)),
    "opt_untied_gelu": ("opt", dict(tie_word_embeddings=False, activation_function="gelu")),
}

PROMPT_LEN, STEPS, TOL = 16, 8, 1e-4


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, make_hf, convert_to):
    kind, kw = VARIANTS[request.param]
    hf = make_hf(request.param, kind, **kw)
    model, store = load_dense(convert_to(hf.path, "float32"))
    return hf, model, store


def test_prompt_logits_match(pair):
    hf, model, _ = pair
    ids = prompt()
    ours = model.forward(ids, model.new_cache(PROMPT_LEN))
    with torch.no_grad():
        ref = hf.model(ids[None]).logits[0].float()
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


def test_greedy_with_kv_cache_matches_generate(pair):
    hf, model, _ = pair
    ids = prompt(2)
    hf.model.generation_config.eos_token_id = None  # always STEPS tokens
    with torch.no_grad():
        out = hf.model.generate(
            ids[None],
            max_new_tokens=STEPS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    ref_tokens = out.sequences[0, PROMPT_LEN:].tolist()

    cache = model.new_cache(4)  # too small on purpose: it must grow
    logits = model.forward(ids, cache)[-1]
    tokens = []
    for step in range(STEPS):
        assert (logits - out.logits[step][0].float()).abs().max().item() <= TOL, f"step {step}"
        tokens.append(int(logits.argmax()))
        logits = model.forward(torch.tensor([tokens[-1]]), cache)[-1]
    assert tokens == ref_tokens
    assert cache.length == PROMPT_LEN + STEPS
    assert greedy(model, ids.tolist(), STEPS) == ref_tokens


def test_ffn_bundle_layout(pair):
    """A bundle is gate + up + down rows (SwiGLU) or up + down (OPT: 2 * dim values, whole pages at
    OPT's widths); OPT's fc1 bias is the resident up_bias, in store order (identity here)."""
    hf, _, store = pair
    c = store.config
    assert all(L.bundle_bytes == (3 if c.gated else 2) * c.dim * 4 for L in store.layers)
    biases = store.up_biases()
    if not c.ffn_bias:
        assert biases == [None] * c.n_layers
        return
    for i, b in enumerate(biases):
        assert torch.equal(b, hf.model.model.decoder.layers[i].fc1.bias.detach().float())


def test_chunked_prefill_equals_one_pass(pair):
    """Feeding the prompt in pieces through the cache gives the logits of one pass."""
    _, model, _ = pair
    ids = prompt(3)
    whole = model.forward(ids, model.new_cache(PROMPT_LEN))
    cache = model.new_cache(PROMPT_LEN)
    parts = [model.forward(ids[a:b], cache) for a, b in ((0, 5), (5, 6), (6, 16))]
    assert (torch.cat(parts) - whole).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", ["llama_gqa", "opt_proj"])
def test_half_precision_close(name, dtype, make_hf, convert_to, monkeypatch):
    kind, kw = VARIANTS[name]
    hf = make_hf(name, kind, **kw)
    model, store = load_dense(convert_to(hf.path, dtype))
    assert store.dtype_name == dtype and model.dtype == getattr(torch, dtype)
    c = store.config
    assert store.layers[0].bundle_bytes == (3 if c.gated else 2) * c.dim * 2  # no bias in the bundle
    ids = prompt()
    ours = model.forward(ids, model.new_cache(PROMPT_LEN))
    with torch.no_grad():
        ref = hf.model(ids[None]).logits[0]
    assert ours.dtype == torch.float32
    scale = ref.abs().max().item()
    tol = 0.01 if dtype == "float16" else 0.06  # bfloat16 keeps 8 mantissa bits
    assert (ours - ref).abs().max().item() <= tol * scale
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.8
    # Short chunks and single tokens take the half-precision kernels (layers.linear).
    cache = model.new_cache(PROMPT_LEN)
    steps = torch.cat(
        [model.forward(ids[:4], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(4, PROMPT_LEN)]
    )
    assert (steps - ref).abs().max().item() <= tol * scale
    if dtype == "float16":
        # The native decode of large float16 models (threads.decode_threads: torch on one thread,
        # every float16 product in llmflash._native.f16_matvec), forced on for this small one.
        import llmflash.threads as th

        threads = torch.get_num_threads()
        monkeypatch.setattr(th, "NATIVE_DECODE_DIM", 1)
        cache = model.new_cache(PROMPT_LEN)
        native = torch.cat(
            [model.forward(ids[:4], cache)] + [model.forward(ids[t : t + 1], cache) for t in range(4, PROMPT_LEN)]
        )
        assert torch.get_num_threads() == threads and not th.in_decode()
        assert (native - ref).abs().max().item() <= tol * scale
        assert (native[4:] - steps[4:]).abs().max().item() <= tol * scale


def test_learned_positions_limit(make_hf, convert_to):
    kind, kw = VARIANTS["opt_pre_ln"]
    model, _ = load_dense(convert_to(make_hf("opt_pre_ln", kind, **kw).path))
    limit = model.config.max_positions
    cache = model.new_cache(10 * limit)
    assert cache.capacity == limit
    model.forward(torch.zeros(limit, dtype=torch.long), cache)
    with pytest.raises(ContextLengthError, match=f"{limit} positions"):
        model.forward(torch.zeros(1, dtype=torch.long), cache)


def test_rope_models_run_past_max_positions(make_hf, convert_to):
    kind, kw = VARIANTS["llama_gqa"]
    model, _ = load_dense(convert_to(make_hf("llama_gqa", kind, **kw).path))
    cache = model.new_cache(2)
    n = model.config.max_positions + 3
    out = model.forward(torch.zeros(n, dtype=torch.long), cache)
    assert out.shape == (n, model.config.vocab_size) and torch.isfinite(out).all()
