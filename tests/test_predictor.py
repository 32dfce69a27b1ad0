"""Sparsity predictors: training recovers a planted low-rank activation pattern; thresholds from
the stored quantiles; the file round-trips; every hostile predictors file is a StoreError that
names it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from store_builders import edit_manifest, planted, reseal, write_predictors, write_store

from llmflash.errors import StoreError
from llmflash.models.config import ModelConfig
from llmflash.sparsity.labels import pack_bits, unpack_bits
from llmflash.sparsity.lowrank import train_layer
from llmflash.sparsity.predictors import Predictors
from llmflash.sparsity.predictors_file import load_predictors, read_predictors
from llmflash.sparsity.quantiles import QUANTILES, share_above, threshold_for_recall
from llmflash.store import PREDICTORS, Store


def test_pack_unpack_roundtrip():
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 40, 1536):
        y = torch.rand(13, n, generator=g) > 0.5
        p = pack_bits(y)
        assert p.dtype == torch.uint8 and p.shape == (13, (n + 7) // 8)
        assert torch.equal(unpack_bits(p, n), y)


def test_planted_low_rank_pattern_is_learned():
    D, n, r = 24, 40, 3
    x, y = planted(6000, D, n, r, seed=0)
    res = train_layer(x, pack_bits(y), n, rank=4, heldout=1000, epochs=8, batch=128, lr=1e-2, seed=0)
    assert res.predictor.in_w.shape == (4, D) and res.predictor.out_w.shape == (n, 4)
    tau = threshold_for_recall(res.pos_quantiles, 0.97)
    xt, yt = planted(3000, D, n, r, seed=7)  # fresh tokens
    pred = res.predictor.logits(xt) > tau
    recall = float((pred & yt).sum() / yt.sum())
    precision = float((pred & yt).sum() / pred.sum())
    assert recall >= 0.95, recall
    assert precision >= 0.85, precision
    # the held-out quantiles predict what fresh data shows
    p = Predictors(
        [res.predictor],
        [tau],
        res.pos_quantiles[None],
        res.neg_quantiles[None],
        torch.tensor([res.pos_rate]),
        torch.zeros(1),
        {"recall": 0.97},
    )
    e = p.expected(0)
    assert abs(e["recall"] - recall) < 0.03 and abs(e["precision"] - precision) < 0.05


def test_training_is_deterministic():
    x, y = planted(800, 16, 24, 2, seed=0)
    a = train_layer(x, pack_bits(y), 24, rank=3, heldout=200, epochs=2, batch=64, seed=5)
    b = train_layer(x, pack_bits(y), 24, rank=3, heldout=200, epochs=2, batch=64, seed=5)
    assert torch.equal(a.predictor.out_w, b.predictor.out_w) and torch.equal(a.pos_quantiles, b.pos_quantiles)


def test_threshold_and_share_from_quantiles():
    q = torch.linspace(-1, 1, QUANTILES)  # uniform on [-1, 1]
    assert threshold_for_recall(q, 0.75) == pytest.approx(-0.5, abs=1e-6)
    assert threshold_for_recall(q, 1.0) < -1.0  # keeps the smallest seen too
    assert share_above(q, 0.5) == pytest.approx(0.25, abs=1e-6)
    assert share_above(q, -2.0) == 1.0 and share_above(q, 2.0) == 0.0
    with pytest.raises(ValueError):
        threshold_for_recall(q, 0.0)


# -- files -------------------------------------------------------------------------------------------
def tiny_config() -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=64,
        dim=16,
        n_layers=2,
        head_dim=8,
        n_heads=[2, 2],
        n_kv_heads=[1, 1],
        ffn_dims=[24, 20],
        max_positions=64,
    )


@pytest.fixture(scope="module")
def pristine_store(tmp_path_factory) -> Path:
    """A tiny random store with a predictors file and its manifest entry."""
    config = tiny_config()
    dst = tmp_path_factory.mktemp("pred") / "tiny.llmflash"
    write_store(dst, config)
    path = write_predictors(dst / PREDICTORS, config)
    edit_manifest(dst, lambda m: m.update(predictors={"file": PREDICTORS, "bytes": path.stat().st_size}))
    return reseal(dst)  # its size and CRC-32 recorded, as calibrate does


@pytest.fixture
def store(pristine_store, tmp_path) -> Path:
    dst = tmp_path / "s.llmflash"
    shutil.copytree(pristine_store, dst)
    return dst


def test_roundtrip_and_wanted_sets(store):
    p = load_predictors(store)
    assert isinstance(p, Predictors) and p.recall == pytest.approx(0.9) and p.meta["rank"] == 3
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    for layer, n in enumerate((24, 20)):
        ids = p(layer, x)
        assert ids.dtype == torch.long and ids.dim() == 1
        assert torch.equal(ids, torch.unique(ids))  # sorted, unique
        union = torch.zeros(n, dtype=torch.bool)
        for t in range(5):
            union[p(layer, x[t : t + 1])] = True
        assert torch.equal(torch.nonzero(union).flatten(), ids)  # union over the tokens
    lo, hi = load_predictors(store, recall=0.5), load_predictors(store, recall=1.0)
    for layer in range(2):
        assert lo.thresholds[layer] > hi.thresholds[layer]
        assert set(lo(layer, x).tolist()) <= set(hi(layer, x).tolist())
        assert lo.expected(layer)["recall"] == pytest.approx(0.5, abs=0.01)


def _rewrite(path: Path, edit_tensors=None, edit_meta=None) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def _set(d, k, v):
    d[k] = v


HOSTILE = [
    ("missing tensor", lambda t: t.pop("layers.1.out.bias"), None, "missing tensors"),
    ("extra tensor", lambda t: _set(t, "layers.2.in.weight", torch.zeros(3, 16)), None, "unexpected tensors"),
    ("wrong width", lambda t: _set(t, "layers.0.out.weight", torch.zeros(25, 3)), None, r"shape \(25, 3\)"),
    ("wrong input dim", lambda t: _set(t, "layers.0.in.weight", torch.zeros(3, 17)), None, "shape"),
    ("rank too big", lambda t: _set(t, "layers.0.in.weight", torch.zeros(100, 16)), None, "1 <= R"),
    ("rank mismatch", lambda t: _set(t, "layers.0.in.bias", torch.zeros(4)), None, "shape"),
    ("nan", lambda t: t["layers.1.in.weight"].__setitem__((0, 0), float("nan")), None, "non-finite"),
    ("inf threshold", lambda t: t["thresholds"].__setitem__(0, math.inf), None, "non-finite"),
    ("int dtype", lambda t: _set(t, "pos_rate", torch.zeros(2, dtype=torch.int32)), None, "dtype"),
    ("few layers", lambda t: _set(t, "thresholds", torch.zeros(3)), None, "thresholds has shape"),
    ("quantiles", lambda t: _set(t, "pos_quantiles", torch.zeros(2, 7)), None, "pos_quantiles"),
    ("unsorted quantiles", lambda t: t["neg_quantiles"].__setitem__((0, 0), 1e9), None, "not increasing"),
    ("rate", lambda t: t["pos_rate"].__setitem__(0, 1.5), None, "pos_rate"),
    ("format", None, lambda m: _set(m, "format", "something-else"), "not a predictors file"),
    ("version", None, lambda m: _set(m, "version", "99"), "unknown predictors version"),
    ("recall", None, lambda m: _set(m, "recall", "1.5"), "recall"),
    ("recall text", None, lambda m: _set(m, "recall", "high"), "recall"),
    ("no recall", None, lambda m: m.pop("recall"), "recall"),
    ("rank text", None, lambda m: _set(m, "rank", "x"), "rank"),
    ("label", None, lambda m: _set(m, "label", "psychic"), "label"),
]


@pytest.mark.parametrize("name,edit_tensors,edit_meta,match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_predictors_file(store, name, edit_tensors, edit_meta, match):
    path = store / PREDICTORS
    _rewrite(path, edit_tensors, edit_meta)
    with pytest.raises(StoreError, match=match) as e:
        read_predictors(path, tiny_config())
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 7,
        b"garbage bytes, not safetensors" * 4,
        (100).to_bytes(8, "little") + b"{not json" + b" " * 91,
        (1 << 62).to_bytes(8, "little") + b"{}",
    ],
)
def test_garbage_predictors_file(store, content):
    path = store / PREDICTORS
    path.write_bytes(content)
    with pytest.raises(StoreError) as e:
        read_predictors(path, tiny_config())
    assert str(path) in str(e.value)


def test_truncated_predictors_file(store):
    path = store / PREDICTORS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(StoreError) as e:
        load_predictors(store)
    assert str(path) in str(e.value)


def test_manifest_entry_must_match_the_file(store):
    edit_manifest(store, lambda m: m["predictors"].update(bytes=m["predictors"]["bytes"] + 1))
    with pytest.raises(StoreError, match="does not match the file"):
        load_predictors(store)


def test_missing_predictors_file_says_calibrate(store):
    (store / PREDICTORS).unlink()
    with pytest.raises(StoreError, match="llmflash calibrate"):
        load_predictors(store)


def test_stay_keeps_cached_neurons_at_the_lower_threshold(store):
    """Hysteresis: a neuron is named when it clears the recall's threshold, or when the cache
    holds it and it clears the (lower) threshold of the stay recall; with nothing cached that is
    the plain prediction, with everything cached the stay recall's own prediction."""
    p = load_predictors(store, recall=0.6, stay=0.95)
    enter, stay = load_predictors(store, recall=0.6), load_predictors(store, recall=0.95)
    assert p.sticky and not enter.sticky and p.recall == 0.6 and p.stay == 0.95
    g = torch.Generator().manual_seed(5)
    for t in range(20):
        x = torch.randn(1, 16, generator=g)
        for layer, n in enumerate((24, 20)):
            cached = torch.rand(n, generator=g) < 0.5
            got = set(p.select(layer, x, cached).tolist())
            lo, hi = set(enter(layer, x).tolist()), set(stay(layer, x).tolist())
            assert got == lo | {i for i in hi if cached[i]}
            assert set(p.select(layer, x, torch.zeros(n, dtype=torch.bool)).tolist()) == lo
            assert set(p.select(layer, x, torch.ones(n, dtype=torch.bool)).tolist()) == hi
            assert torch.equal(p(layer, x), enter(layer, x))  # without a cache view: the enter rule
    # the two thresholds differ: some neuron would be kept only because it is cached
    x = torch.randn(8, 16, generator=g)
    assert any(len(stay(i, x[t : t + 1])) > len(enter(i, x[t : t + 1])) for t in range(8) for i in range(2))


@pytest.mark.parametrize(
    "recall,stay,match",
    [
        (0.9, 0.8, "below the recall"),
        (0.9, 1.5, r"stay must be in \(0, 1\]"),
        (0.0, None, r"recall must be in \(0, 1\]"),
    ],
)
def test_stay_recall_is_checked(store, recall, stay, match):
    with pytest.raises(ValueError, match=match):
        load_predictors(store, recall=recall, stay=stay)


@pytest.mark.parametrize("spec", ["predictor:0.9/x", "predictor:a", "predictor:0.9/0.8"])
def test_sticky_sparsity_spec_errors(store, spec):
    from llmflash.sparsity import make_source

    with pytest.raises(ValueError, match="sparsity|below"):
        make_source(spec, Store(store))
