"""Shadow predictors (llmflash.sparsity.shadow): 4-bit gate/up rows as the wanted-set scorer, calibrated
and evaluated end to end on tiny random-weight stores."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tokenizer_json
from hypothesis import given, settings
from hypothesis import strategies as st
from store_builders import reseal, shadow_args

from llmflash.cli import main
from llmflash.errors import StoreError
from llmflash.sparsity import shadow
from llmflash.sparsity.predictors_file import load_predictors
from llmflash.sparsity.shadow import GROUP, ShadowLayer, dequantize4, quantize4
from llmflash.store import PREDICTORS, Store


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), groups=st.integers(1, 4), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31))
def test_quantize_round_trip_within_half_a_step(rows, groups, scale, seed):
    w = torch.randn(rows, groups * GROUP, generator=torch.Generator().manual_seed(seed)) * scale
    codes, scales = quantize4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (rows, groups * GROUP // 2)
    back = dequantize4(codes, scales)
    step = scales.float().repeat_interleave(GROUP, dim=1)
    assert bool(((back - w).abs() <= step * 0.5 + 1e-3 * step + 1e-6).all())


@pytest.mark.parametrize("kernel", [True, False])
def test_scores_match_the_dequantized_rows(kernel, monkeypatch):
    monkeypatch.setattr(shadow, "_INT4_CPU", shadow._INT4_CPU and kernel)
    torch.manual_seed(0)
    n, D = 64, 128
    w1 = torch.randn(2 * n, D) * 0.1
    L = ShadowLayer.from_weights(w1, gated=True)
    assert (L._packed is not None) == (shadow._INT4_CPU and kernel)
    x = torch.randn(3, D)
    ref = dequantize4(L.codes, L.scales)
    g, u = (x @ ref.T).chunk(2, dim=-1)
    want = (F.silu(g) * u).abs()
    assert torch.allclose(L.scores(x), want, rtol=0.03, atol=0.03 * float(want.abs().max()))
    relu = ShadowLayer.from_weights(w1[:n], gated=False, up_bias=torch.ones(n))
    assert torch.allclose(relu.scores(x), x @ ref[:n].T + 1, rtol=0.03, atol=0.03)
    held = L.nbytes()
    assert L.release_codes().codes is None and L.nbytes() < held
    assert torch.allclose(L.scores(x), want, rtol=0.03, atol=0.03 * float(want.abs().max()))


@pytest.fixture(scope="module")
def shadow_store(hf_llama, convert_to, texts):  # noqa: F811
    store = convert_to(hf_llama.path, dtype="float32")
    assert main(shadow_args(store, texts[0], "--recall", "0.95")) == 0
    return store


def test_shadow_calibration_file_and_predictions(shadow_store):
    entry = json.loads((shadow_store / "manifest.json").read_text())["predictors"]
    assert entry["kind"] == "shadow" and entry["bytes"] == (shadow_store / PREDICTORS).stat().st_size
    store = Store(shadow_store)
    p = load_predictors(store)
    assert p.kind == "shadow" and all(isinstance(L, ShadowLayer) for L in p.layers)
    assert 0.9 <= entry["expected"]["recall"] <= 1.0


def test_shadow_eval_precision_and_budget(shadow_store, texts, capsys):  # noqa: F811
    from llmflash.api import FlashModel

    assert (
        main(
            [
                "eval",
                str(shadow_store),
                "--text",
                str(texts[1]),
                "--tokens",
                "64",
                "--memory",
                "0.9x",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    pr = r["predictor"]
    assert pr["kind"] == "shadow" and pr["recall"] > 0.8
    base = sum(L["label_share"] for L in r["layers"]) / len(r["layers"])  # precision of a random guess
    assert pr["precision"] > 1.3 * base, (pr, base)
    assert r["predictor_only"]["ratio"] < 1.5
    # eval's flash counts the predictors inside the budget, exactly like the strategy itself
    flash = FlashModel.open(shadow_store, strategy="flash", memory="0.9x", sparsity="predictor")
    n_total = sum(Store(shadow_store).config.ffn_dims)
    assert r["flash"][0]["cached_share"] == pytest.approx(flash.ffn.stats()["cache_capacity_neurons"] / n_total)
    assert flash.ffn.source.nbytes() > 0


def test_shadow_relu_model(hf_opt, convert_to, texts):  # noqa: F811
    store = convert_to(hf_opt.path, dtype="float32")
    (store / "tokenizer.json").write_text(tiny_tokenizer_json())
    reseal(store)  # recorded, as if converted with it
    assert main(shadow_args(store, texts[0], "--tokens", "300", "--chunk", "60")) == 0
    p = load_predictors(store)
    assert p.kind == "shadow" and p.meta["label"] == "relu"
    assert all(
        L.up_bias is not None and L.up_bias.shape == (Store(store).config.ffn_dims[i],) for i, L in enumerate(p.layers)
    )


def test_hostile_shadow_files(shadow_store, tmp_path):
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    other = tmp_path / "s.llmflash"
    shutil.copytree(shadow_store, other)
    path = other / PREDICTORS
    with safe_open(str(path), framework="pt") as f:
        md = dict(f.metadata())
    t = load_file(str(path))

    def write(tensors, meta):
        save_file(tensors, str(path), metadata=meta)
        reseal(other)  # its size and checksum recorded

    for bad, meta, what in [
        ({**t, "layers.0.shadow.codes": t["layers.0.shadow.codes"][:, :-1].contiguous()}, md, "shape"),
        ({**t, "layers.0.shadow.codes": t["layers.0.shadow.codes"].float()}, md, "dtype"),
        ({**t, "layers.1.shadow.scales": torch.full_like(t["layers.1.shadow.scales"], float("nan"))}, md, "non-finite"),
        ({k: v for k, v in t.items() if k != "layers.1.shadow.scales"}, md, "missing"),
        (t, {**md, "kind": "lowrank"}, "missing"),
        (t, {**md, "kind": "magic"}, "kind"),
    ]:
        write(bad, meta)
        with pytest.raises(StoreError, match=what) as e:
            load_predictors(other)
        assert PREDICTORS in str(e.value)


def test_eval_reports_a_budget_that_cannot_hold_the_predictors(shadow_store, texts, capsys):  # noqa: F811
    """A budget below resident + predictors is one row saying so, not a failed evaluation."""
    assert (
        main(
            [
                "eval",
                str(shadow_store),
                "--text",
                str(texts[1]),
                "--tokens",
                "24",
                "--memory",
                "1x",
                "--memory",
                "1KB",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    ok, bad = r["flash"]
    assert ok["memory"] == "1x" and ok["ppl"] > 1
    assert bad["memory"] == "1KB" and "resident" in bad["error"]
    assert (
        main(["eval", str(shadow_store), "--text", str(texts[1]), "--tokens", "24", "--memory", "1KB", "--quiet"]) == 0
    )
    assert "does not fit" in capsys.readouterr().out
