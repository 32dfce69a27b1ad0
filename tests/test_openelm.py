"""OpenELM: no weights are available offline, so random tensors under the Hugging Face checkpoint
names, a config.json like Apple's, and a reference forward written here from Apple's code
(corenet general_gpt.py and the HF modeling_openelm.py), independent of llmflash's model code."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import tiny_tokenizer_json
from openelm_builders import (
    DIVISOR,
    FFN,
    GROUPS,
    HD,
    HEADS,
    KV_HEADS,
    D,
    L,
    V,
    hf_config,
    random_weights,
    ref_forward,
    save_openelm,
)

from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError
from llmflash.models.openelm import make_divisible, openelm_dims
from llmflash.models.transformer import greedy
from llmflash.strategies.dense import load_dense


@pytest.fixture(scope="module")
def elm(tmp_path_factory):
    w = random_weights()
    src = save_openelm(tmp_path_factory.mktemp("openelm") / "hf", hf_config(), w)
    tok = tmp_path_factory.mktemp("tok")
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json(V))
    dst = tmp_path_factory.mktemp("store") / "elm.llmflash"
    convert_hf(src, dst, dtype="float32", tokenizer=tok)
    return w, dst


# -- the layer-wise scaling formula -----------------------------------------------------------------
def test_make_divisible():
    assert make_divisible(640, 256) == 768  # nearest multiple
    assert make_divisible(1, 8) == 8  # at least the divisor
    assert make_divisible(10, 8) == 16  # 8 would lose more than 10%
    assert make_divisible(5120, 256) == 5120


def test_tiny_dims_both_config_styles():
    for ffn in ([0.5, 4.0], [0.5, 1.67, 2.83, 4.0]):
        d = openelm_dims(D, HD, L, GROUPS, [0.5, 1.0], ffn, DIVISOR)
        assert (d.n_heads, d.n_kv_heads, d.ffn_dims) == (HEADS, KV_HEADS, FFN)


def test_openelm_270m_dims():
    """OpenELM-270M-like shape: 16 layers, d=1280, head_dim 64 -> query heads 12x5, 16x7, 20x4; FFN 768 ... 5120."""
    d = openelm_dims(1280, 64, 16, 4, (0.5, 1.0), (0.5, 4.0), 256)
    assert d.n_heads == [12] * 5 + [16] * 7 + [20] * 4
    assert d.n_kv_heads == [h // 4 for h in d.n_heads]
    assert d.ffn_dims[0] == 768 and d.ffn_dims[-1] == 5120
    assert d.ffn_dims == sorted(d.ffn_dims) and all(f % 256 == 0 for f in d.ffn_dims)


# -- conversion and the forward ---------------------------------------------------------------------
def test_converted_config(elm):
    _, dst = elm
    model, store = load_dense(dst)
    c = store.config
    assert (c.arch, c.n_heads, c.n_kv_heads, c.ffn_dims) == ("openelm", HEADS, KV_HEADS, FFN)
    assert c.qk_norm and c.gated and c.tie_embeddings and c.norm_eps == 1e-6
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert [L_.n_neurons for L_ in store.layers] == FFN
    assert store.tokenizer() is not None and store.tokenizer().encode("t5 t7").ids == [5, 7]


def test_logits_match_reference(elm):
    w, dst = elm
    model, _ = load_dense(dst)
    ids = torch.randint(0, V, (16,), generator=torch.Generator().manual_seed(3))
    ours = model.forward(ids, model.new_cache(16))
    ref = ref_forward(w, ids)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches_reference(elm):
    w, dst = elm
    model, _ = load_dense(dst)
    ids = torch.randint(0, V, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    ours = greedy(model, ids, 8)
    seq = list(ids)
    for _ in range(8):  # reference: full recomputation each step
        seq.append(int(ref_forward(w, torch.tensor(seq))[-1].argmax()))
    assert ours == seq[len(ids) :]


@pytest.mark.parametrize("style", ["hf", "corenet"])
def test_untied_and_corenet_style_config(style, tmp_path):
    w = random_weights(seed=1, tie=False)
    src = save_openelm(tmp_path / "hf", hf_config(style, share_input_output_layers=False), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_hf(src, tmp_path / "st", dtype="float32")
    model, store = load_dense(tmp_path / "st")
    assert not store.config.tie_embeddings and store.config.ffn_dims == FFN
    ids = torch.arange(12)
    assert (model.forward(ids, model.new_cache(12)) - ref_forward(w, ids, tie=False)).abs().max() <= 1e-4


def test_head_list_disagreeing_with_formula(tmp_path):
    src = save_openelm(tmp_path / "hf", hf_config(num_query_heads=[4, 4, 6, 8]), random_weights())
    with pytest.raises(ConvertError, match="num_query_heads") as e:
        convert_hf(src, tmp_path / "st", tokenizer=None)
    assert str(src / "config.json") in str(e.value)
    assert not (tmp_path / "st").exists()


def test_tensor_shape_disagreeing_with_formula(tmp_path):
    w = random_weights()
    w["transformer.layers.2.ffn.proj_1.weight"] = torch.zeros(2 * 320, D)
    src = save_openelm(tmp_path / "hf", hf_config(), w)
    with pytest.raises(ConvertError, match=r"transformer\.layers\.2\.ffn\.proj_1\.weight.*\(640, 128\)") as e:
        convert_hf(src, tmp_path / "st")
    assert str(src / "model.safetensors") in str(e.value)


def test_missing_tokenizer_argument_path(tmp_path):
    src = save_openelm(tmp_path / "hf", hf_config(), random_weights())
    with pytest.raises(ConvertError, match="tokenizer.json") as e:
        convert_hf(src, tmp_path / "st", tokenizer=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
