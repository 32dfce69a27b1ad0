"""`llmflash calibrate` and `llmflash eval` end to end on tiny random-weight stores (converted
from transformers models): the predictors file and manifest entry, determinism, the flash
strategy driven by the predictors, and the eval report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_json
from store_builders import calibrate_args, permute_store, reseal

from llmflash.cli import main
from llmflash.errors import StoreError
from llmflash.sparsity.predictors_file import load_predictors
from llmflash.store import PREDICTORS, Store


@pytest.fixture(scope="module")
def llama_store(hf_llama, convert_to, texts, tmp_path_factory) -> Path:
    store = convert_to(hf_llama.path, dtype="float32")
    assert main(calibrate_args(store, texts[0], "--recall", "0.99")) == 0
    return store


def test_calibrate_writes_file_and_manifest(llama_store):
    path = llama_store / PREDICTORS
    assert path.is_file()
    entry = json.loads((llama_store / "manifest.json").read_text())["predictors"]
    assert entry["file"] == PREDICTORS and entry["bytes"] == path.stat().st_size
    assert entry["rank"] == 16 and entry["recall"] == 0.99 and entry["tokens"] == 1200 and entry["label"] == "magnitude"
    assert 0.9 <= entry["expected"]["recall"] <= 1.0
    assert not [p for p in llama_store.iterdir() if p.name.startswith(".")]  # no temporary files left
    store = Store(llama_store)  # the store still validates
    p = load_predictors(store)
    assert len(p.layers) == store.config.n_layers and p.meta["tokens"] == 1200
    assert p.layers[0].in_w.shape == (16, store.config.dim)
    assert p.layers[0].out_w.shape == (store.config.ffn_dims[0], 16)


def test_calibrate_is_deterministic(llama_store, texts, tmp_path):
    other = tmp_path / "again.llmflash"
    shutil.copytree(llama_store, other)
    (other / PREDICTORS).unlink()
    assert main(calibrate_args(other, texts[0], "--recall", "0.99")) == 0
    a, b = _contents(other / PREDICTORS), _contents(llama_store / PREDICTORS)
    assert a[1] == b[1] and a[0].keys() == b[0].keys()  # metadata (the header's order varies)
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def test_flash_with_predictors_close_to_dense(llama_store, texts):
    from llmflash.api import FlashModel

    tok = Store(llama_store).tokenizer()
    ids = tok.encode(texts[1].read_text()).ids[:40]
    dense = FlashModel.open(llama_store, strategy="dense").logits(ids)
    flash = FlashModel.open(llama_store, strategy="flash", memory="1x", window=4, sparsity="predictor:1.0")
    got = torch.cat([_decode(flash, ids)])
    err = (got - dense).abs().max() / dense.abs().max()
    assert err < 0.05, float(err)
    assert flash.ffn.stats()["bytes_read"] > 0
    # a low recall names fewer neurons and drifts further from dense
    low = FlashModel.open(llama_store, strategy="flash", memory="1x", window=0, sparsity="predictor:0.3")
    assert (_decode(low, ids) - dense).abs().max() / dense.abs().max() > err


def _decode(model, ids: list[int]) -> torch.Tensor:
    """Logits token by token through the KV cache (the flash caches are per-token state)."""
    m = model.model
    cache = m.new_cache(len(ids))
    with torch.inference_mode():
        return torch.cat([m.forward(torch.tensor([t]), cache) for t in ids])


def test_eval_json(llama_store, texts, capsys):
    assert (
        main(
            [
                "eval",
                str(llama_store),
                "--text",
                str(texts[1]),
                "--tokens",
                "48",
                "--memory",
                "1x",
                "--memory",
                "0.9x",
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 48 and r["window"] == 4
    assert r["dense"]["ppl"] > 1 and r["predictor_only"]["ppl"] > 1
    assert [f["memory"] for f in r["flash"]] == ["1x", "0.9x"]
    for f in r["flash"]:
        assert f["ppl"] > 1 and 0 < f["wanted_share"] <= 1 and f["read_share"] > 0
    assert len(r["layers"]) == 2
    for L in r["layers"]:
        assert 0 <= L["recall"] <= 1 and 0 <= L["precision"] <= 1
    assert 0.9 <= r["predictor"]["recall"] <= 1.0


def test_eval_table(llama_store, texts, capsys):
    assert main(["eval", str(llama_store), "--text", str(texts[1]), "--tokens", "24", "--memory", "1x", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "predictor only" in out and "flash 1x" in out and "precision" in out


@pytest.mark.parametrize("mode", ["layer", "attention"])
def test_eval_lookahead_reports_the_guess(llama_store, texts, capsys, mode):
    """eval --lookahead: the guess's recall and precision against each layer's own predicted set,
    and the FFN shares read early and late; the named share counts the layer's own sets only."""
    assert (
        main(
            [
                "eval",
                str(llama_store),
                "--text",
                str(texts[1]),
                "--tokens",
                "32",
                "--memory",
                "0.9x",
                "--lookahead",
                mode,
                "--json",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    f = r["flash"][0]
    assert r["lookahead"] == mode
    assert 0 < f["guess_recall"] <= 1 and 0 < f["guess_precision"] <= 1
    assert f["ahead_read_share"] > 0 and f["late_read_share"] >= 0
    assert f["wanted_share"] == pytest.approx(r["predictor"]["predicted_share"], abs=0.05)


def test_relu_model_calibrates(hf_opt, convert_to, texts):
    store = convert_to(hf_opt.path, dtype="float32")
    (store / "tokenizer.json").write_text(tiny_tokenizer_json())
    reseal(store)  # recorded, as if converted with it
    assert (
        main(
            [
                "calibrate",
                str(store),
                "--text",
                str(texts[0]),
                "--tokens",
                "300",
                "--rank",
                "8",
                "--epochs",
                "1",
                "--chunk",
                "60",
                "--quiet",
            ]
        )
        == 0
    )
    p = load_predictors(store)
    assert p.meta["label"] == "relu" and p.label_thresholds.tolist() == [0.0, 0.0]


def test_cli_errors(tmp_path, llama_store, texts, capsys):
    assert main(["calibrate", str(tmp_path / "nothing")]) == 2
    assert "no such store" in capsys.readouterr().err
    assert main(["calibrate", str(llama_store), "--text", str(tmp_path / "missing.txt")]) == 2
    assert main(["calibrate", str(llama_store), "--text", str(texts[0]), "--sparsity", "1.5"]) == 2
    bare = tmp_path / "bare.llmflash"
    shutil.copytree(llama_store, bare)
    (bare / PREDICTORS).unlink()
    assert main(["eval", str(bare), "--text", str(texts[1]), "--tokens", "8"]) == 2
    assert "llmflash calibrate" in capsys.readouterr().err
    with pytest.raises(StoreError):
        load_predictors(bare)


class _Spy:
    """A sticky source around predictors that checks each selection against the plain rule:
    every plainly predicted neuron is named, and every other named one is cached."""

    sticky = True

    def __init__(self, p):
        self.p, self.kept = p, 0

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.p(layer, x)

    def select(self, layer: int, x: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
        ids, plain = self.p.select(layer, x, cached), set(self.p(layer, x).tolist())
        extra = set(ids.tolist()) - plain
        assert plain <= set(ids.tolist()) and all(cached[i] for i in extra)
        self.kept += len(extra)
        return ids

    def nbytes(self) -> int:
        return self.p.nbytes()


def test_sticky_predictors_see_the_cache_in_original_ids(llama_store, texts, tmp_path):
    """Flash hands a sticky source what each layer's cache holds, in original neuron ids: on a
    store with shuffled neurons it names the same sets and gives the unshuffled store's logits
    (a mix-up of store positions and ids would keep other neurons); and the stay threshold
    does keep cached neurons the plain rule drops."""
    from llmflash.api import FlashModel

    perm = permute_store(llama_store, tmp_path / "perm.llmflash")
    assert Store(perm).layers[0].order is not None
    ids = Store(llama_store).tokenizer().encode(texts[1].read_text()).ids[:24]
    out, spies = [], []
    for path in (llama_store, perm):
        spy = _Spy(load_predictors(path, recall=0.8, stay=0.99))
        model = FlashModel.open(path, strategy="flash", memory="1x", window=2, sparsity=spy)
        out.append(_decode(model, ids))
        spies.append(spy)
    assert spies[0].kept > 0 and spies[0].kept == spies[1].kept
    assert (out[0] - out[1]).abs().max() <= 1e-4 * out[0].abs().max()
    plain = _decode(
        FlashModel.open(llama_store, strategy="flash", memory="1x", window=2, sparsity="predictor:0.8"), ids
    )
    assert (plain - out[0]).abs().max() > 1e-3 * out[0].abs().max()  # the kept neurons count


@pytest.mark.parametrize("mode", ["layer", "attention"])
def test_sticky_selection_does_not_depend_on_a_lookahead_guess(llama_store, texts, mode):
    """A sticky source sees what the cache held before a guess was admitted, not the guess: with
    the wanted rows computed, room for every neuron and nothing kept past the token (window 0, so
    a wrong guess neither lingers into the next token's cache nor takes a true neuron's slot),
    lookahead gives the logits of no lookahead (fails when the guess counts as cached)."""
    from llmflash.api import FlashModel

    ids = Store(llama_store).tokenizer().encode(texts[1].read_text()).ids[:24]
    opts = dict(strategy="flash", memory="1.5x", window=0, sparsity="predictor:0.8/0.99", compute="wanted")
    want = _decode(FlashModel.open(llama_store, **opts), ids)
    got = _decode(FlashModel.open(llama_store, lookahead=mode, **opts), ids)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_eval_sticky_spec(llama_store, texts, capsys, monkeypatch):
    from llmflash.sparsity.predictors import Predictors

    calls = []
    select = Predictors.select
    monkeypatch.setattr(Predictors, "select", lambda self, *a: calls.append(1) or select(self, *a))
    assert (
        main(
            [
                "eval",
                str(llama_store),
                "--text",
                str(texts[1]),
                "--tokens",
                "24",
                "--memory",
                "0.9x",
                "--sparsity",
                "predictor:0.8/0.99",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["predictor"]["recall_target"] == 0.8 and r["predictor"]["stay"] == 0.99
    assert len(calls) >= 23 * 2  # flash named every layer's set with it
    assert r["flash"][0]["ppl"] > 1 and 0 < r["flash"][0]["wanted_share"] <= 1


def test_recording_follows_a_forward_pass_split_into_several(llama_store, monkeypatch):
    """A wide model's forward pass runs a calibration chunk as several passes through the layers
    (Transformer.prefill_chunk): every token's FFN input still lands in its own row, the same as
    with one pass (before, every pass wrote over the chunk's first rows)."""
    import llmflash.models.transformer as transformer
    from llmflash.sparsity.calibration import record
    from llmflash.strategies.dense import DenseFFN

    store = Store(llama_store)
    dense = DenseFFN(store, dequantize=True)
    ids = [(7 * t + 3) % 97 + 1 for t in range(100)]
    whole = record(store, dense, ids, 0.5, 50, progress=False)
    monkeypatch.setattr(transformer, "PREFILL_CHUNK", 8)  # each 50-token chunk: 7 passes
    split = record(store, dense, ids, 0.5, 50, progress=False)
    for a, b in zip(whole.x, split.x):
        assert torch.allclose(a.float(), b.float(), atol=1e-4)
    for a, b in zip(whole.y, split.y):
        assert (a == b).float().mean() > 0.99
