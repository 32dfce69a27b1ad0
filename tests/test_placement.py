"""Neuron placement (`llmflash place`, llmflash.placement): planted co-activation groups end up
contiguous, a placed store computes the same logits as before (Llama, OPT with its resident fc1
bias, OpenELM, a quantized store, an already permuted one), the rewrite is atomic and refuses a
corrupt store, and the command's bad input exits with code 2."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import flip_bit, tiny_tokenizer_json
from openelm_builders import V, hf_config, random_weights, save_openelm
from store_builders import permute_store, run_cli

from llmflash.api import FlashModel
from llmflash.convert.hf import convert_hf
from llmflash.errors import InvalidArgumentError, StoreError
from llmflash.placement import place_store
from llmflash.placement.coactivation import runs_per_token
from llmflash.placement.order import layer_order
from llmflash.store import FFN, Store
from llmflash.verify import verify_store

IDS = [(7 * t + 3) % 97 + 1 for t in range(160)]  # tokens of the tiny test vocabularies (128)
PROMPT = [5, 17, 3, 99, 42, 8, 64, 1, 23, 77]


def planted(n: int, size: int, tokens: int, p: float, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(wanted (tokens, n) bool, groups (n / size, size) ids): neurons in random groups that
    fire together (each group on for a token with probability p), plus independent noise."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    groups = perm.view(-1, size)
    on = torch.rand(tokens, groups.shape[0], generator=g) < p
    wanted = on[:, torch.argsort(perm) // size]
    return wanted | (torch.rand(tokens, n, generator=g) < noise), groups


def positions(order: torch.Tensor) -> torch.Tensor:
    pos = torch.empty_like(order)
    pos[order] = torch.arange(len(order))
    return pos


@pytest.mark.parametrize("n,size,noise", [(384, 16, 0.02), (1536, 64, 0.05), (1000, 8, 0.0)])
def test_planted_groups_are_placed_contiguously(n, size, noise):
    wanted, groups = planted(n - n % size, size, 1024, 0.1, noise, seed=n)
    order = layer_order(wanted)
    assert sorted(order.tolist()) == list(range(wanted.shape[1]))
    pos = positions(order)
    spans = [int(pos[gr].max() - pos[gr].min()) for gr in groups]
    assert spans == [size - 1] * len(groups)
    assert runs_per_token(wanted, order) < 0.5 * runs_per_token(wanted, None)


def test_hot_neurons_go_last_most_active_first():
    wanted, groups = planted(256, 16, 512, 0.2, 0.01, seed=1)
    hot = groups[3]  # a whole group pinned: it must leave the path
    order = layer_order(wanted, hot)
    tail = order[-16:]
    assert set(tail.tolist()) == set(hot.tolist())
    activity = wanted.sum(0)[tail]
    assert bool((activity[:-1] >= activity[1:]).all())
    spans = [int(positions(order)[gr].max() - positions(order)[gr].min()) for i, gr in enumerate(groups) if i != 3]
    assert spans == [15] * 15


def _convert(src: Path, dst: Path, dtype: str = "float32", tokenizer: Path | None = None) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_hf(src, dst, dtype=dtype, tokenizer=tokenizer)


def _logits(path: Path, **kw) -> torch.Tensor:
    return FlashModel.open(path, **kw).logits(PROMPT)


@pytest.fixture(scope="module")
def elm_store(tmp_path_factory) -> Path:
    src = save_openelm(tmp_path_factory.mktemp("openelm") / "hf", hf_config(), random_weights())
    tok = tmp_path_factory.mktemp("tok")
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json(V))
    return _convert(src, tmp_path_factory.mktemp("elm") / "elm.llmflash", tokenizer=tok)


@pytest.mark.parametrize("arch", ["llama", "opt", "openelm", "llama-q4_1", "llama-permuted"])
def test_placed_store_gives_the_same_logits(arch, make_hf, elm_store, tmp_path):
    if arch == "openelm":
        store = shutil.copytree(elm_store, tmp_path / "s.llmflash")
    elif arch == "llama-permuted":
        plain = _convert(make_hf("llama", "llama").path, tmp_path / "plain.llmflash")
        store = permute_store(plain, tmp_path / "s.llmflash", seed=3)
    else:
        kind, _, dtype = arch.partition("-")
        store = _convert(make_hf(kind, kind).path, tmp_path / "s.llmflash", dtype or "float32")
    before = {s: _logits(store, strategy=s) for s in ("dense", "naive")}
    old = Store(store)
    before_orders = [L.order for L in old.layers]
    # each layer's bundles in original neuron order (row j = neuron j's bundle)
    by_id = [
        old.read_layer(i)[torch.argsort(torch.tensor(L.order))] if L.order is not None else old.read_layer(i)
        for i, L in enumerate(old.layers)
    ]
    r = place_store(store, IDS, sparsity="oracle:0.3", progress=False)
    assert r["runs_per_token"]["after"] <= r["runs_per_token"]["before"]
    s = Store(store)
    assert s.manifest["placement"]["sparsity"] == "oracle:0.3"
    assert [L.order for L in s.layers] != before_orders
    for i, L in enumerate(s.layers):  # bundle p is neuron order[p], wherever it was before
        assert torch.equal(s.read_layer(i), by_id[i][torch.tensor(L.order)])
    assert verify_store(store, progress=False).bundles > 0
    # float32 stores: 1e-5 of the logits' scale; a quantized store's bundle kernel sums the down
    # contributions group by group in store order, so the permutation moves its float32 rounding
    tol = 1e-4 if "q4_1" in arch else 1e-5
    for strategy, ref in before.items():
        got = _logits(store, strategy=strategy)
        assert (got - ref).abs().max().item() <= tol * max(1.0, ref.abs().max().item()), strategy
    flash = _logits(store, strategy="flash", sparsity="all", memory="1x")
    assert (flash - before["dense"]).abs().max().item() <= tol * max(1.0, before["dense"].abs().max().item())


def test_opt_fc1_bias_moves_with_its_neurons(make_hf, tmp_path):
    store = _convert(make_hf("opt", "opt").path, tmp_path / "s.llmflash")
    old = Store(store)
    bias = old.up_biases()[0].clone()
    rows = old.read_layer(0).clone()
    place_store(store, IDS, sparsity="oracle:0.3", progress=False)
    new = Store(store)
    order = torch.tensor(new.layers[0].order)
    assert torch.equal(new.up_biases()[0], bias[order])  # the original order was the identity
    assert torch.equal(new.read_layer(0), rows[order])


def test_interrupted_placement_leaves_the_store_as_it_was(make_hf, tmp_path, monkeypatch):
    store = _convert(make_hf("opt", "opt").path, tmp_path / "s.llmflash")
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    import llmflash.placement.rewrite as rw

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rw, "write_manifest", killed)  # after ffn.bin, the CRCs and the biases
    with pytest.raises(KeyboardInterrupt):
        place_store(store, IDS, sparsity="oracle:0.3", progress=False)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert verify_store(store, progress=False).bundles > 0


def test_a_corrupt_store_is_refused_and_left_alone(make_hf, tmp_path):
    store = _convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash")
    flip_bit(store / FFN, Store(store).layers[1].offset + 10)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(StoreError) as e:
        place_store(store, IDS, sparsity="oracle:0.3", progress=False)
    assert "ffn.bin" in str(e.value)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _identity(store: Store) -> list[torch.Tensor]:
    return [torch.arange(L.n_neurons) for L in store.layers]


@pytest.mark.parametrize("where", ["ffn.bin", "bundles.crc32"])
def test_the_rewrite_checks_what_it_moves(make_hf, tmp_path, where):
    """Corruption that appears after the store was opened (past what recording read): the rewrite's
    own checks refuse it, naming the file, and nothing changes."""
    from llmflash.placement.rewrite import rewrite_store

    store = _convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash")
    s = Store(store)
    offset = s.layers[1].offset + 10 if where == "ffn.bin" else 4 * (s.layers[0].n_neurons + 3)
    flip_bit(store / where, offset)
    files = {p.name: p.read_bytes() for p in store.iterdir()}
    with pytest.raises(StoreError) as e:
        rewrite_store(s, _identity(s), {}, progress=False)
    assert where in str(e.value)
    assert {p.name: p.read_bytes() for p in store.iterdir()} == files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_store_changed_meanwhile_is_not_overwritten(make_hf, tmp_path):
    from store_builders import edit_manifest

    from llmflash.placement.rewrite import rewrite_store

    store = _convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash")
    s = Store(store)
    edit_manifest(store, lambda m: m.update(source="elsewhere"))  # as calibrate would, meanwhile
    with pytest.raises(StoreError, match="changed while it was being placed"):
        rewrite_store(s, _identity(s), {}, progress=False)
    assert Store(store).manifest["source"] == "elsewhere" and "placement" not in Store(store).manifest


def test_a_store_reached_through_a_link_is_placed_where_it_lies(make_hf, tmp_path):
    real = _convert(make_hf("llama", "llama").path, tmp_path / "real" / "s.llmflash")
    (tmp_path / "links").mkdir()
    link = tmp_path / "links" / "s.llmflash"
    link.symlink_to(real)
    place_store(link, IDS, sparsity="oracle:0.3", progress=False)
    assert link.is_symlink() and "placement" in Store(real).manifest
    assert [p.name for p in (tmp_path / "links").iterdir()] == ["s.llmflash"]
    assert [p.name for p in (tmp_path / "real").iterdir()] == ["s.llmflash"]


def test_bad_arguments(make_hf, tmp_path):
    store = _convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash")
    for kw, what in [
        (dict(decay=0.0), "decay"),
        (dict(partners=0), "partners"),
        (dict(hot=1.5), "hot"),
        (dict(sparsity="nonsense"), "sparsity"),
    ]:
        with pytest.raises(InvalidArgumentError, match=what):
            place_store(store, IDS, progress=False, **kw)
    with pytest.raises(InvalidArgumentError, match="token"):
        place_store(store, [], progress=False)


def test_cli(make_hf, tmp_path):
    hf = make_hf("llama", "llama")
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json())
    store = _convert(hf.path, tmp_path / "s.llmflash", tokenizer=tok)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"t{i}" for i in IDS))
    r = run_cli("place", str(store), "--text", str(text), "--sparsity", "oracle:0.3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "runs of wanted neurons per token" in r.stderr
    assert Store(store).manifest["placement"]["tokens"] == len(IDS)
    for args, what in [
        (("place", str(tmp_path / "missing")), "missing"),
        (("place", str(store), "--decay", "2"), "decay"),
        (("place", str(store), "--text", str(tmp_path / "nope.txt")), "nope.txt"),
        (("place", str(store), "--bogus"), "bogus"),
    ]:
        r = run_cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert what in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_recording_follows_a_forward_pass_split_into_several(make_hf, tmp_path, monkeypatch):
    """A wide model runs each recording chunk as several passes through the layers: every token's
    wanted set still lands in its own row."""
    import llmflash.models.transformer as transformer
    from llmflash.placement.coactivation import record_wanted
    from llmflash.sparsity import make_source
    from llmflash.strategies.dense import DenseFFN

    store = Store(_convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash"))
    dense = DenseFFN(store, dequantize=True)
    source = make_source("oracle:0.3", store)
    whole = record_wanted(store, dense, source, IDS, 64, progress=False)
    monkeypatch.setattr(transformer, "PREFILL_CHUNK", 8)
    split = record_wanted(store, dense, source, IDS, 64, progress=False)
    for a, b in zip(whole, split):
        assert bool(b.any(1).all())  # every token wants some neuron
        assert (a == b).float().mean() > 0.99


def test_a_corrupt_bundle_read_as_overflow_is_a_store_error(make_hf, tmp_path):
    """Flash reads the neurons its small caches cannot hold on a worker thread beside the fill: a
    bundle failing its CRC there is a StoreError naming ffn.bin in the caller, and the model
    keeps working on the bundles that are sound."""
    store = _convert(make_hf("llama", "llama").path, tmp_path / "s.llmflash")
    model = FlashModel.open(store, strategy="flash", sparsity="all", memory="0.8x")
    ref = model.logits(PROMPT)
    assert model.stats()["overflow"] > 0 and max(model.ffn.plan.capacities) < 96
    L = Store(store).layers[1]
    flip_bit(store / FFN, L.offset + 90 * L.bundle_bytes + 5)  # neuron 90: beyond any cache row
    with pytest.raises(StoreError, match=r"ffn\.bin"):
        model.logits(PROMPT)
    flip_bit(store / FFN, L.offset + 90 * L.bundle_bytes + 5)  # repaired
    assert torch.equal(model.logits(PROMPT), ref)
