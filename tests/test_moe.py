"""Mixture of experts (Mixtral): conversion, the router, and every strategy against
transformers over a prompt and 8 greedy steps; the expert caches under budgets, the lookahead
guess, CRC-checked expert reads, and hostile manifests."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flip_bit, tiny_tokenizer_json

from llmflash import FlashModel, StoreError
from llmflash.cli import main
from llmflash.store import Store
from llmflash.strategies.flash import model_bytes

PROMPT = [1, 5, 9, 3, 7, 2, 11, 4, 30, 17]
STEPS = 8


@pytest.fixture(scope="module")
def mixtral(make_hf, convert_to):
    hf = make_hf("mixtral", "mixtral")
    (hf.path / "tokenizer.json").write_text(tiny_tokenizer_json())
    return hf, convert_to(hf.path)


def hf_steps(model, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits over the prompt and `steps` greedy tokens (whole sequence each step)."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(torch.tensor([ids])).logits[0]
            ids.append(int(out[-1].argmax()))
        return model(torch.tensor([ids])).logits[0], ids[len(prompt) :]


def flash_steps(fm: FlashModel, prompt: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Prefill, then one token at a time through the KV cache."""
    m = fm.model
    cache = m.new_cache(len(prompt) + steps + 1)
    out = [m.forward(torch.tensor(prompt), cache)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(out[-1][-1].argmax()))
        out.append(m.forward(torch.tensor([tokens[-1]]), cache))
    return torch.cat(out), tokens


def expert_budget(path: Path, share: float) -> int:
    """Bytes leaving the expert caches `share` of the experts (after resident and scratch)."""
    s = Store(path)
    resident, ffn = model_bytes(s)
    c = s.config
    scratch = c.experts_per_token * c.expert_dim(0) * s.layers[0].bundle_bytes
    return resident + scratch + int(share * ffn)


CASES = [
    ("dense", {}),
    ("naive", {}),
    ("flash", {}),
    ("flash", {"share": 0.5, "window": 2}),
    ("flash", {"share": 0.2, "window": 1}),
    ("flash", {"share": 0.0, "window": 0}),
    ("flash", {"share": 0.5, "lookahead": True}),
    ("flash", {"share": 0.3, "overlap": False}),
]


@pytest.mark.parametrize("strategy,opts", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_mixtral_matches_transformers(mixtral, strategy, opts):
    hf, path = mixtral
    ref, ref_tokens = hf_steps(hf.model, PROMPT, STEPS)
    opts = dict(opts)
    if "share" in opts:
        opts["memory"] = expert_budget(path, opts.pop("share"))
    fm = FlashModel.open(path, strategy=strategy, **opts)
    got, tokens = flash_steps(fm, PROMPT, STEPS)
    assert tokens == ref_tokens
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    if strategy == "dense":
        return
    s = fm.stats()
    assert s["experts_read_per_token"] > 0 and s["bytes_read"] >= s["bytes_useful"] > 0
    if strategy == "naive":
        assert s["cache_capacity_experts"] == 0 and s["hits"] == 0
    if opts.get("lookahead"):
        assert s["guess_named"] > 0 and 0 <= s["guess_right"] <= s["guess_named"]


def test_expert_cache_hits_and_window(mixtral):
    """With room for every expert and a long window, what a token's experts were read once they
    are hits; the bytes read cover exactly the experts read (no neuron-level reads)."""
    _, path = mixtral
    fm = FlashModel.open(path, strategy="flash", window=100)
    flash_steps(fm, PROMPT, STEPS)
    s = fm.stats()
    c = fm.store.config
    expert_bytes = c.expert_dim(0) * fm.store.layers[0].bundle_bytes
    assert s["misses"] <= c.n_experts * c.n_layers and s["overflow"] == 0
    assert s["hits"] > 0 and s["bytes_useful"] == s["misses"] * expert_bytes
    # the whole model's experts at most once each
    assert s["bytes_read"] <= c.n_layers * c.n_experts * expert_bytes * 1.0 + 8192 * c.n_layers


def test_convert_keeps_experts_contiguous(mixtral):
    """Expert e of layer i is bundles [e*F, (e+1)*F) of its region: gate, up and down rows as
    transformers holds them."""
    hf, path = mixtral
    s = Store(path)
    c = s.config
    assert (c.n_experts, c.experts_per_token, c.norm_topk_prob) == (8, 2, True)
    F = c.expert_dim(1)
    rows = s.read_layer(1)
    moe = hf.model.model.layers[1].mlp
    for e in (0, 5):
        gate_up = moe.experts.gate_up_proj[e].detach()  # (2F, D)
        bundle = rows[e * F : (e + 1) * F]
        assert torch.equal(bundle[:, : c.dim], gate_up[:F])
        assert torch.equal(bundle[:, c.dim : 2 * c.dim], gate_up[F:])
        assert torch.equal(bundle[:, 2 * c.dim :], moe.experts.down_proj[e].detach().t())
    assert torch.equal(s.routers()[1], moe.gate.weight.detach())


def test_a_corrupt_expert_is_a_store_error(mixtral, tmp_path):
    import shutil

    _, path = mixtral
    bad = tmp_path / "bad.llmflash"
    shutil.copytree(path, bad)
    s = Store(bad)
    c, L = s.config, s.layers[0]
    F = c.expert_dim(0)
    fm = FlashModel.open(bad, strategy="flash", window=0)
    ids = torch.tensor(PROMPT)
    from llmflash.models.moe import expert_ids, route

    x = torch.randn(len(PROMPT), c.dim)
    used = expert_ids(route(x, s.routers()[0], c)[0])
    assert used
    for e in range(c.n_experts):  # every expert of layer 0 gets one flipped bit
        flip_bit(bad / "ffn.bin", L.offset + (e * F + F // 2) * L.bundle_bytes + 3)
    with pytest.raises(StoreError, match="ffn.bin"):
        fm.logits(ids)


def test_expert_crcs_combine_the_neuron_crcs(mixtral):
    from llmflash.io import combine_crcs

    _, path = mixtral
    s = Store(path)
    L, F = s.layers[0], s.config.expert_dim(0)
    data = (s.path / "ffn.bin").read_bytes()
    table = combine_crcs(s.bundle_crcs(0), F, L.bundle_bytes)
    for e in range(s.config.n_experts):
        a = L.offset + e * F * L.bundle_bytes
        assert table[e] == zlib.crc32(data[a : a + F * L.bundle_bytes])


def edit_config(path: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the store whose manifest's config has `changes`, re-signed (a hostile manifest
    that passes its checksum)."""
    import shutil

    from store_builders import edit_manifest

    dst = tmp_path / "edited.llmflash"
    shutil.copytree(path, dst)
    edit_manifest(dst, lambda m: m["config"].update(changes))
    return dst


@pytest.mark.parametrize(
    "changes,what",
    [
        ({"n_experts": 3}, "n_experts"),
        ({"experts_per_token": 9}, "experts_per_token"),
        ({"experts_per_token": 0}, "experts_per_token"),
        ({"n_experts": 4}, "router"),
        ({"n_experts": -1}, "n_experts"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ],
)
def test_hostile_moe_manifest(mixtral, tmp_path, capsys, changes, what):
    _, path = mixtral
    bad = edit_config(path, tmp_path, **changes)
    with pytest.raises(StoreError) as e:
        FlashModel.open(bad, strategy="flash").logits([1, 2])
    assert what in str(e.value) and ("manifest.json" in str(e.value) or "resident" in str(e.value)), str(e.value)
    assert main(["generate", str(bad), "-p", "t1", "-n", "1"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_neuron_options_are_refused(mixtral, capsys):
    _, path = mixtral
    from llmflash import InvalidArgumentError

    for opts in ({"sparsity": "oracle"}, {"hot": 0.2}, {"lookahead": "attention"}):
        with pytest.raises(InvalidArgumentError):
            FlashModel.open(path, strategy="flash", **opts)


def test_cli_bench_and_generate_on_experts(mixtral, capsys, tmp_path):
    _, path = mixtral
    assert main(["generate", str(path), "-p", "t1 t2 t3", "-n", "4", "--memory", "0.8x", "--stats"]) == 0
    out = capsys.readouterr()
    assert "experts_read_per_token" in out.out + out.err
    js = tmp_path / "b.json"
    assert main(["bench", str(path), "--tokens", "3", "--strategies", "naive,flash", "--json", str(js)]) == 0
    rows = json.loads(js.read_text())
    assert {r["strategy"] for r in (rows if isinstance(rows, list) else rows["rows"])} >= {"naive"}


def test_routing_is_transformers(mixtral):
    hf, path = mixtral
    from llmflash.models.moe import route

    s = Store(path)
    x = torch.randn(6, s.config.dim)
    experts, weights = route(x, s.routers()[0], s.config)
    _, scores, idx = hf.model.model.layers[0].mlp.gate(x)
    assert torch.equal(experts, idx) and torch.allclose(weights, scores, atol=1e-6)
    assert np.allclose(weights.sum(-1).numpy(), 1.0, atol=1e-6)


def test_eval_on_experts_equals_dense(mixtral):
    from llmflash.commands.evaluation import evaluate

    _, path = mixtral
    text = " ".join(f"t{(7 * i) % 60 + 3}" for i in range(40))
    out = evaluate(path, text=text, tokens=40, memories=["0.9x", "1x"], progress=False, lookahead="layer")
    for row in out["flash"]:
        assert abs(row["ratio"] - 1.0) < 1e-4, row
        assert row["experts_read_per_token"] > 0 and 0.0 <= row["hit_rate"] <= 1.0
        assert row["wanted_share"] == 2 / 8


@pytest.mark.parametrize("argv", [["calibrate"], ["place"]])
def test_neuron_commands_refuse_experts(mixtral, capsys, argv):
    _, path = mixtral
    assert main([*argv, str(path)]) == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and str(path) in err and "Traceback" not in err
