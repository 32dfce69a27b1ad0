"""Memory that follows what a run uses: the KV cache grows as tokens come (a generation that may
run long but stops early, or a manifest claiming millions of positions, allocates nothing up
front), a long prompt runs in chunks and its attention in query blocks (memory linear in the
prompt), and peak RSS stays within the README's bound."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from store_builders import tiny_config, write_store

import llmflash
import llmflash.api
from llmflash.models import layers, transformer
from llmflash.models.transformer import KV_STEP, KVCache

PYTHONPATH = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}


@pytest.fixture(scope="module")
def long_store(tmp_path_factory) -> Path:
    """A random Llama-shaped store with room for long prompts."""
    return write_store(tmp_path_factory.mktemp("long") / "s.llmflash", tiny_config(max_positions=1 << 24))


def test_kv_cache_grows_by_a_quarter_and_keeps_its_contents():
    cache = KVCache([2, 3], head_dim=4, capacity=10, dtype=torch.float32)
    cache.k[1][:, :10] = torch.arange(30.0).view(3, 10, 1)
    cache.length = 10
    for n in (11, 300, 1000, 5000):
        cache.reserve(n)
        assert n <= cache.capacity <= max(1.25 * n + KV_STEP, n)
    assert torch.equal(cache.k[1][:, :10, 0], torch.arange(30.0).view(3, 10))
    assert cache.k[0].shape == (2, cache.capacity, 4) and cache.v[1].shape == (3, cache.capacity, 4)


def test_generation_reserves_only_what_will_come(long_store, monkeypatch):
    """`generate --chat -n 10**12` allocated prompt + n positions up front (189 MB on SmolLM2 while
    stopping after 8 tokens; a manifest claiming 2**24 positions asked for 6.4 GB): now a
    generation reserves KV_STEP ahead and the cache grows as tokens come."""
    model = llmflash.FlashModel.open(long_store)
    sizes: list[int] = []
    real = model.model.new_cache
    monkeypatch.setattr(model.model, "new_cache", lambda n: sizes.append(n) or real(n))
    next(model.generate_ids([2, 3, 4], max_new_tokens=10**12, stop_at_eos=False))
    assert sizes == [3 + KV_STEP]
    ids = list(zip(range(KV_STEP + 40), model.generate_ids([2, 3], max_new_tokens=10**12, stop_at_eos=False)))
    assert len(ids) == KV_STEP + 40  # ran past the first reservation: it grew


def test_chunked_prefill_equals_one_pass(long_store, monkeypatch):
    """A prompt longer than PREFILL_CHUNK runs in chunks through the layers: the same logits as
    one pass (float32, to rounding), and the same cache for the tokens after it."""
    model = llmflash.FlashModel.open(long_store)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (300,), generator=g).tolist()
    monkeypatch.setattr(transformer, "PREFILL_CHUNK", 1 << 20)
    whole = model.logits(ids)
    monkeypatch.setattr(transformer, "PREFILL_CHUNK", 64)
    chunked = model.logits(ids)
    assert chunked.shape == whole.shape == (300, 64)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    last = model.model.forward(torch.tensor(ids), model.model.new_cache(1), last_only=True)
    torch.testing.assert_close(last, whole[-1:], rtol=1e-5, atol=1e-5)


def test_attention_in_query_blocks_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 50, 8, generator=g)  # 6 query heads, 50 new positions
    k, v = torch.randn(2, 70, 8, generator=g), torch.randn(2, 70, 8, generator=g)  # 20 cached before
    one = layers.causal_attention(q, k, v, start=20)
    monkeypatch.setattr(layers, "SCORE_BLOCK_BYTES", 4 * 6 * 70 * 7)  # blocks of 7 queries
    blocks = layers.causal_attention(q, k, v, start=20)
    torch.testing.assert_close(blocks, one, rtol=1e-6, atol=1e-6)


HWM_PROBE = r"""
import sys, llmflash, torch, tokenizers, numpy, safetensors
import llmflash.api, llmflash.strategies.flash
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) * 1024
store, tokens, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if mode == 'tokenizer':                      # what the tokenizer alone takes in memory
    base = hwm()
    tok = tokenizers.Tokenizer.from_file(store + '/tokenizer.json')
    print(hwm() - base)
elif mode == 'prefill':                      # a prompt of `tokens` random ids, dense
    m = llmflash.FlashModel.open(store)
    base = hwm()
    ids = torch.randint(100, 40000, (tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    list(m.generate_ids(ids, max_new_tokens=1))
    print(hwm() - base, m.kv_cache_bytes(tokens + 1))
else:                                        # flash with the store's predictors at budget `mode`
    base = hwm()
    m = llmflash.FlashModel.open(store, memory=mode, sparsity='predictor')
    prompt = m.encode('The capital of France is')
    n = sum(1 for _ in m.generate_ids(prompt, max_new_tokens=tokens, stop_at_eos=False))
    assert n == tokens, n
    print(hwm() - base, m.ffn.plan.budget, m.kv_cache_bytes(len(prompt) + tokens))
"""


def probe(*args: str) -> list[int]:
    out = subprocess.run(
        [sys.executable, "-c", HWM_PROBE, *map(str, args)], capture_output=True, text=True, env=PYTHONPATH, timeout=1800
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return [int(x) for x in out.stdout.split()]


def test_long_prompt_prefill_memory_is_linear():
    """README: a prompt's prefill needs its KV cache plus at most WORKING_BYTES, whatever its
    length (chunks of PREFILL_CHUNK tokens, attention in score blocks). Before: 1,001 tokens took
    902 MB, 4,001 tokens 2,271 MB (the T x T scores, and the logits of every position)."""
    from llmflash.defaults import ensure_default_store

    store = ensure_default_store()
    for tokens in (1000, 4000):
        grown, kv = probe(store, tokens, "prefill")
        bound = kv + llmflash.api.WORKING_BYTES
        assert grown <= bound, f"prefill of {tokens} tokens grew {grown / 1e6:.0f} MB, over {bound / 1e6:.0f} MB"


def test_peak_rss_over_2000_tokens_with_predictors(tmp_path):
    """README: peak RSS = the runtime (Python, torch) + the --memory budget + the tokenizer + the KV
    cache + at most WORKING_BYTES. The campaign's case: SmolLM2 with predictors at 0.6x, 2,000
    tokens (before: 867 MB against a promised 776; the predictors' load left ~150 MB of glibc heap
    behind, and kept their file's memory map resident beside their packed form)."""
    from llmflash.commands.calibrate import calibrate
    from llmflash.defaults import ensure_default_store

    store = tmp_path / "smollm2.llmflash"
    shutil.copytree(ensure_default_store(), store)
    calibrate(store, tokens=1024, epochs=1, progress=False)
    (tokenizer,) = probe(store, 0, "tokenizer")
    grown, budget, kv = probe(store, 2000, "0.6x")
    bound = budget + tokenizer + kv + llmflash.api.WORKING_BYTES
    assert grown <= bound, (
        f"peak RSS grew {grown / 1e6:.0f} MB: budget {budget / 1e6:.0f} + tokenizer "
        f"{tokenizer / 1e6:.0f} + KV cache {kv / 1e6:.0f} + working {64} MB = {bound / 1e6:.0f}"
    )


@pytest.mark.parametrize(
    "field,value",
    [
        ("n_layers", 4097),
        ("dim", (1 << 17) + 1),
        ("vocab_size", (1 << 22) + 1),
        ("max_positions", (1 << 24) + 1),
        ("head_dim", 4100),
    ],
)
def test_model_counts_are_bounded(field, value):
    """A manifest's counts are bounded as a converter's are (models.config.MAX_*), so nothing is
    planned or allocated from an absurd one."""
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=f"config.{field}"):
        config.validate()


def test_manifest_ffn_width_is_bounded():
    with pytest.raises(ValueError, match="ffn_dims"):
        tiny_config(ffn_dims=[48, (1 << 20) + 1]).validate()
