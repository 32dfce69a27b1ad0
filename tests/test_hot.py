"""Hot pinning: calibrate records each neuron's activity rate; `load_predictors(hot=share)` pins
the most active share of each layer (resident, always computed) and keeps predictor rows for the
others only; flash computes the hot rows every token and names only cold neurons to the caches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_json
from safetensors import safe_open
from safetensors.torch import save_file
from store_builders import calibrate_args, permute_store, reseal, shadow_args

from llmflash.api import FlashModel
from llmflash.cli import main
from llmflash.errors import StoreError
from llmflash.sparsity.predictors_file import load_predictors
from llmflash.store import PREDICTORS, Store


@pytest.fixture(scope="module", params=["llama-lowrank", "llama-shadow", "opt-lowrank"])
def store(request, hf_llama, hf_opt, convert_to, texts) -> Path:  # noqa: F811
    arch, kind = request.param.split("-")
    path = convert_to((hf_llama if arch == "llama" else hf_opt).path, dtype="float32")
    if not (path / "tokenizer.json").is_file():
        (path / "tokenizer.json").write_text(tiny_tokenizer_json())
        reseal(path)  # recorded, as if converted with it
    args = calibrate_args(path, texts[0]) if kind == "lowrank" else shadow_args(path, texts[0])
    assert main([*args, "--recall", "0.9"]) == 0
    return path


def test_calibrate_records_neuron_rates(store):
    p = load_predictors(store)
    assert p.rates is not None and p.hot is None
    for r, n in zip(p.rates, Store(store).config.ffn_dims):
        assert r.shape == (n,) and bool(((r >= 0) & (r <= 1)).all())
        assert 0.2 < float(r.mean()) < 0.8  # magnitude labels keep 50%; ReLU: act > 0
        assert float(r.std()) > 0  # neurons differ


def test_hot_pinning_splits_each_layer_and_keeps_cold_predictions(store):
    full, p = load_predictors(store), load_predictors(store, hot=0.4)
    assert p.nbytes() < full.nbytes()  # no predictor rows for hot neurons
    x = torch.randn(3, Store(store).config.dim, generator=torch.Generator().manual_seed(0))
    for i, n in enumerate(Store(store).config.ffn_dims):
        hot, cold = set(p.hot[i].tolist()), set(p.cold[i].tolist())
        assert hot.isdisjoint(cold) and hot | cold == set(range(n))
        assert len(cold) % 16 == 0 and abs(len(hot) - 0.4 * n) <= 16
        assert float(full.rates[i][p.hot[i]].min()) >= float(full.rates[i][p.cold[i]].max())
        # the cold neurons are predicted exactly as without pinning; hot ones never named
        named = set(full(i, x).tolist())
        assert set(p(i, x).tolist()) == named & cold
        assert bool(p.predict(i, x)[:, p.hot[i]].all())
        assert torch.equal(p.predict(i, x)[:, p.cold[i]], full.predict(i, x)[:, p.cold[i]])


def _decode(model, ids):
    m = model.model
    cache = m.new_cache(len(ids))
    with torch.inference_mode():
        return torch.cat([m.forward(torch.tensor([t]), cache) for t in ids])


def test_flash_computes_hot_and_predicted_neurons(store, texts, tmp_path):  # noqa: F811
    """Flash with hot pinning (wanted rows only) computes exactly the hot neurons plus the
    predicted cold ones: the dense FFN restricted to that set (eval's "predictor only") gives the
    same logits, also on a store with shuffled neurons (the hot rows are found by position)."""
    from llmflash.commands.evaluation import _ProbeFFN
    from llmflash.models.transformer import Transformer

    ids = Store(store).tokenizer().encode(texts[1].read_text()).ids[:20]
    p = load_predictors(store, hot=0.4)
    probe = Transformer.from_store(Store(store), _ProbeFFN(Store(store), p, restrict=True))
    with torch.inference_mode():
        want = probe.forward(torch.tensor(ids), probe.new_cache(len(ids)))
    perm = permute_store(store, tmp_path / "perm.llmflash")
    for path in (store, perm):
        model = FlashModel.open(
            path, strategy="flash", memory="1x", window=2, sparsity="predictor", hot=0.4, compute="wanted"
        )
        got = _decode(model, ids)
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
        s = model.ffn.stats()
        assert s["hot_neurons"] == sum(len(h) for h in p.hot)
    dense = FlashModel.open(store, strategy="dense").logits(ids)
    assert (want - dense).abs().max() > 1e-3 * dense.abs().max()  # the restriction is real


def test_hot_rows_are_counted_in_the_budget(store):
    from llmflash.strategies.flash import FlashFFN

    s = Store(store)
    plain, hot = FlashFFN(s, memory="1x", sparsity="predictor"), FlashFFN(s, memory="1x", sparsity="predictor", hot=0.4)
    bb = s.layers[0].bundle_bytes
    n_hot = sum(len(h) for h in hot.source.hot)
    hot_bytes = n_hot * bb + sum(
        b.numel() * 4 for b in (lay.hot_bias for lay in hot.layers) if b is not None
    )  # OPT: fc1 bias copies
    assert hot.plan.resident - plain.plan.resident == hot_bytes - (plain.source.nbytes() - hot.source.nbytes())
    # the caches hold cold neurons only; when every cold neuron fits, no scratch area is reserved
    cold = [L.n_neurons - len(h) for L, h in zip(s.layers, hot.source.hot)]
    assert all(c <= n for c, n in zip(hot.plan.capacities, cold))
    roomy = FlashFFN(s, memory="3x", sparsity="predictor", hot=0.4)
    assert list(roomy.plan.capacities) == cold and roomy.plan.scratch == 0


def test_a_hot_share_near_one_keeps_some_cold_neurons(store):
    p = load_predictors(store, hot=0.999)
    assert all(len(c) == 16 for c in p.cold)
    model = FlashModel.open(store, strategy="flash", memory="1.5x", sparsity="predictor", hot=0.999)
    assert torch.isfinite(model.logits([1, 2, 3])).all()


def test_hot_needs_rates_and_predictors(store, tmp_path):
    from llmflash.sparsity import make_source

    with pytest.raises(ValueError, match="hot pinning needs the calibrated predictors"):
        make_source("oracle", Store(store), hot=0.4)
    with pytest.raises(ValueError, match="hot share"):
        load_predictors(store, hot=1.0)
    other = tmp_path / "old.llmflash"
    shutil.copytree(store, other)
    path = other / PREDICTORS
    with safe_open(str(path), framework="pt") as f:
        t, md = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())

    def write(tensors):
        save_file(tensors, str(path), metadata=md)
        reseal(other)  # its size and checksum recorded

    write({k: v for k, v in t.items() if not k.endswith(".rate")})  # a file from before rates
    assert load_predictors(other).rates is None
    with pytest.raises(StoreError, match="calibrate` again") as e:
        load_predictors(other, hot=0.4)
    assert str(path) in str(e.value)
    write({k: v for k, v in t.items() if k != "layers.1.rate"})
    with pytest.raises(StoreError, match="rates for 1 of 2 layers"):
        load_predictors(other)
    write({**t, "layers.0.rate": t["layers.0.rate"] + 2})
    with pytest.raises(StoreError, match="outside"):
        load_predictors(other)
    write({**t, "layers.0.rate": t["layers.0.rate"][:-1].contiguous()})
    with pytest.raises(StoreError, match="shape"):
        load_predictors(other)


def test_eval_hot_json(store, texts, capsys):  # noqa: F811
    assert (
        main(
            [
                "eval",
                str(store),
                "--text",
                str(texts[1]),
                "--tokens",
                "24",
                "--memory",
                "1x",
                "--hot",
                "0.4",
                "--sparsity",
                "predictor:0.8/0.95",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    f = r["flash"][0]
    assert r["hot"] == 0.4 and 0.2 < f["hot_share"] < 0.6
    assert f["cached_share"] >= f["hot_share"] and f["wanted_share"] >= f["hot_share"]


def test_cli_generate_with_hot_and_sticky(store, capsys):
    assert (
        main(
            [
                "generate",
                str(store),
                "-p",
                "t1 t2 t3",
                "-n",
                "3",
                "--memory",
                "1.5x",
                "--hot",
                "0.4",
                "--sparsity",
                "predictor:0.8/0.99",
                "--stats",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out.strip() and "hot_neurons" in out.out + out.err
    assert main(["generate", str(store), "-p", "t1", "-n", "1", "--strategy", "dense", "--hot", "0.4"]) == 2
