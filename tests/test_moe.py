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


KINDS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


@pytest.fixture(scope="module")
def models(make_hf, convert_to):
    out = {}
    for kind in KINDS:
        hf = make_hf(kind, kind)
        (hf.path / "tokenizer.json").write_text(tiny_tokenizer_json())
        out[kind] = (hf, convert_to(hf.path))
    return out


@pytest.fixture(scope="module")
def mixtral(models):
    return models["mixtral"]


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
    ("flash", {"share": 0.3, "lookahead": "attention", "window": 1}),
    ("flash", {"share": 0.3, "overlap": False}),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strategy,opts", CASES, ids=[f"{s}-{o}" for s, o in CASES])
def test_matches_transformers(models, kind, strategy, opts):
    hf, path = models[kind]
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
    assert 2 <= s["distinct_experts_per_layer"] <= 8
    if strategy == "naive":
        assert s["cache_capacity_experts"] == 0 and s["hits"] == 0
    if opts.get("lookahead"):
        assert s["guess_named"] > 0 and 0 <= s["guess_right"] <= s["guess_named"]


def test_lookahead_does_not_count_the_guesses_as_tokens(mixtral):
    """A guess's admission is taken out of the counts: the admissions are the tokens' (one per
    layer and step) and experts read never exceed the routed ones plus the guesses."""
    _, path = mixtral
    for mode in ("layer", "attention"):
        fm = FlashModel.open(path, strategy="flash", memory=expert_budget(path, 0.3), window=1, lookahead=mode)
        flash_steps(fm, PROMPT, STEPS)
        s = fm.stats()
        assert s["admissions"] == s["steps"] * fm.store.config.n_layers, mode
        assert s["hits"] + s["misses"] + s["overflow"] <= s["wanted_named"] + s["guess_named"] + len(PROMPT) * 16


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


def test_a_permuted_expert_store_is_refused(mixtral, tmp_path):
    import shutil

    from store_builders import edit_manifest

    _, path = mixtral
    bad = tmp_path / "perm.llmflash"
    shutil.copytree(path, bad)
    edit_manifest(bad, lambda m: m["layers"][0].update(order=list(range(m["layers"][0]["n_neurons"]))[::-1]))
    with pytest.raises(StoreError, match=r"layers\[0\].order"):
        Store(bad)


@pytest.mark.parametrize(
    "changes,what",
    [
        ({"n_experts": 3}, "n_experts"),
        ({"experts_per_token": 9}, "experts_per_token"),
        ({"experts_per_token": 0}, "experts_per_token"),
        ({"n_experts": 4}, "router"),
        ({"n_experts": -1}, "n_experts"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
        ({"shared_expert_gate": True}, "shared_expert_gate"),
        ({"shared_expert_dim": 16}, "shared"),
        ({"qk_norm_all": True}, "qk_norm_all"),
        ({"act": "gelu"}, "SiLU"),
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


def test_architectures_map_their_parts(models, convert_to, make_hf):
    """Each source's own features reach the config; a dense store's manifest has none of the
    later fields (earlier versions read it)."""
    cfg = {k: Store(p).config for k, (_, p) in models.items()}
    assert cfg["mixtral"].norm_topk_prob and not cfg["olmoe"].norm_topk_prob
    assert (cfg["qwen2_moe"].shared_expert_dim, cfg["qwen2_moe"].shared_expert_gate) == (40, True)
    assert cfg["qwen2_moe"].attn_bias and not cfg["mixtral"].attn_bias
    assert cfg["olmoe"].qk_norm_all and cfg["qwen3_moe"].qk_norm and not cfg["qwen3_moe"].qk_norm_all
    dense = convert_to(make_hf("llama", "llama").path)
    written = json.loads((dense / "manifest.json").read_text())["config"]
    assert not {"n_experts", "shared_expert_dim", "qk_norm_all"} & set(written)


def test_unsupported_moe_layouts_are_refused(make_hf, tmp_path):
    from llmflash import UnsupportedModelError
    from llmflash.convert.hf import convert_hf

    hf = make_hf("qwen2_moe", "qwen2_moe")
    for key, value in (("mlp_only_layers", [1]), ("decoder_sparse_step", 2), ("use_sliding_window", True)):
        src = tmp_path / key
        import shutil

        shutil.copytree(hf.path, src)
        c = json.loads((src / "config.json").read_text())
        c[key] = value
        (src / "config.json").write_text(json.dumps(c))
        with pytest.raises(UnsupportedModelError, match="config.json"):
            convert_hf(src, tmp_path / f"{key}.llmflash")


def test_neuron_options_are_refused(mixtral, capsys):
    _, path = mixtral
    from llmflash import InvalidArgumentError

    for opts in ({"sparsity": "oracle"}, {"hot": 0.2}, {"compute": "wanted"}):
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


@pytest.mark.parametrize(
    "argv",
    [["calibrate"], ["place"], ["eval", "--hot", "0.2"], ["bench", "--tokens", "1", "--hot", "0.2"]],
)
def test_neuron_commands_refuse_experts(mixtral, capsys, argv):
    _, path = mixtral
    assert main([argv[0], str(path), *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert "mixture-of-experts" in err and str(path) in err and "Traceback" not in err


def write_mixtral_gguf(path: Path, model, experts: str | None = None, kv: dict | None = None) -> None:
    """The HF Mixtral `model` as llama.cpp writes it: arch llama with expert_count, the Q/K row
    permutation, stacked expert tensors and the router ffn_gate_inp (float32; the experts in
    the gguf type `experts` when given, quantized by gguf.quants along their rows)."""
    import gguf
    from gguf_builders import llama_cpp_permute

    c = model.config
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out = gguf.GGUFWriter(path, "llama")
    for key, value in (
        ("block_count", c.num_hidden_layers),
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_attention_heads),
        ("attention.head_count_kv", c.num_key_value_heads),
        ("rope.dimension_count", c.hidden_size // c.num_attention_heads),
        ("expert_count", c.num_local_experts),
        ("expert_used_count", c.num_experts_per_tok),
    ):
        out.add_uint32(f"llama.{key}", (kv or {}).get(key, value))
    out.add_float32("llama.rope.freq_base", float(c.rope_parameters["rope_theta"]))
    out.add_float32("llama.attention.layer_norm_rms_epsilon", c.rms_norm_eps)
    out.add_uint32("tokenizer.ggml.bos_token_id", 1)
    out.add_uint32("tokenizer.ggml.eos_token_id", 2)
    out.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    out.add_tensor("output_norm.weight", sd["model.norm.weight"])
    out.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        out.add_tensor(b + "attn_q.weight", llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        out.add_tensor(b + "attn_k.weight", llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        out.add_tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        out.add_tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        out.add_tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
        out.add_tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        moe = p + "mlp."
        out.add_tensor(b + "ffn_gate_inp.weight", sd[moe + "gate.weight"])
        gate_up = sd[moe + "experts.gate_up_proj"]  # (E, 2F, D)
        F = c.intermediate_size
        for name, w in (
            ("ffn_gate_exps", gate_up[:, :F]),
            ("ffn_up_exps", gate_up[:, F:]),
            ("ffn_down_exps", sd[moe + "experts.down_proj"]),
        ):
            w = np.ascontiguousarray(w)
            if experts is None:
                out.add_tensor(b + name + ".weight", w)
            else:
                q = gguf.GGMLQuantizationType[experts]
                out.add_tensor(b + name + ".weight", gguf.quants.quantize(w, q), raw_dtype=q)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()


def test_gguf_mixtral_converts_to_its_hf_twin(mixtral, tmp_path):
    from safetensors.torch import load_file

    from llmflash.convert.gguf import convert_gguf

    hf, path = mixtral
    src = tmp_path / "mixtral.gguf"
    write_mixtral_gguf(src, hf.model)
    store = convert_gguf(src, tmp_path / "g.llmflash", dtype="float32")
    a, b = Store(store), Store(path)
    assert (a.config.n_experts, a.config.experts_per_token, a.config.ffn_dims) == (8, 2, b.config.ffn_dims)
    assert (store / "ffn.bin").read_bytes() == (path / "ffn.bin").read_bytes()
    ra, rb = load_file(str(store / "resident.safetensors")), load_file(str(path / "resident.safetensors"))
    assert set(ra) == set(rb)
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    ref, _ = hf_steps(hf.model, PROMPT, 3)
    got, _ = flash_steps(FlashModel.open(store, strategy="flash", memory="0.8x"), PROMPT, 3)
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_gguf_quantized_experts_keep_their_blocks(mixtral, convert_to, tmp_path, kind):
    """A GGUF whose stacked experts are in the store's block format converts to the ffn.bin the
    HF twin quantized once gives (the same gguf.quants blocks, no second rounding)."""
    from llmflash.convert.gguf import convert_gguf

    hf, _ = mixtral
    src = tmp_path / "mixtral.gguf"
    write_mixtral_gguf(src, hf.model, experts=kind.upper())
    store = convert_gguf(src, tmp_path / "g.llmflash", dtype=kind)
    twin = convert_to(hf.path, dtype=kind)
    assert (store / "ffn.bin").read_bytes() == (twin / "ffn.bin").read_bytes()
    a, b = (
        flash_steps(FlashModel.open(store, strategy="flash"), PROMPT, 2)[0],
        flash_steps(FlashModel.open(twin), PROMPT, 2)[0],
    )
    assert (a - b).abs().max().item() <= 1e-3 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize(
    "kv,what",
    [
        ({"expert_count": 4}, "ffn_gate_inp"),
        ({"expert_used_count": 9}, "experts_per_token"),
        ({"expert_used_count": 0}, "expert_used_count"),
        ({"expert_count": 1 << 20}, "expert_count"),
    ],
)
def test_hostile_gguf_experts(mixtral, tmp_path, capsys, kv, what):
    """Expert metadata that disagrees with the tensors (or with itself) is a ConvertError naming
    the file and what is wrong; the CLI exits 2 and writes nothing."""
    hf, _ = mixtral
    src = tmp_path / "bad.gguf"
    write_mixtral_gguf(src, hf.model, kv=kv)
    dst = tmp_path / "bad.llmflash"
    assert main(["convert", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert str(src) in err and what in err and "Traceback" not in err, err
    assert not dst.exists()


def quantized_moe(model, kind: str):
    """transformers' mixture-of-experts model with every weight rounded as a quantized store rounds it (gguf.quants
    round trips): 2-D matrices along their rows, each expert's gate/up rows along D and its down
    along its neurons; the router and a shared expert's gate stay float32, as the store keeps them."""
    import copy

    from gguf_builders import rt, rt_padded

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) or p.dim() == 1:
                continue
            if p.dim() == 2:
                p.copy_(rt(p, kind))
            elif name.endswith("gate_up_proj"):
                p.copy_(torch.stack([rt(w, kind) for w in p]))
            else:  # down_proj (E, D, F): blocks along each expert's neurons
                p.copy_(torch.stack([rt_padded(w, kind) for w in p]))
    return ref.eval()


@pytest.mark.parametrize(
    "arch,kind",
    [
        ("mixtral", "q8_0"),
        ("mixtral", "q4_0"),
        ("mixtral", "q4_1"),
        ("olmoe", "q8_0"),
        ("qwen3_moe", "q4_0"),
        ("qwen2_moe", "q8_0"),
    ],
)
def test_quantized_experts_match_their_rounding(models, make_hf, convert_to, arch, kind):
    """A quantized expert store: dense, naive and flash (a small budget) equal transformers over
    the same rounded weights within the quantized kernels' 1e-3, and flash equals dense; decode
    runs the native attention kernels (and must still add Qwen2-MoE's shared expert)."""
    hf = (
        make_hf("qwen2_moe64", "qwen2_moe", shared_expert_intermediate_size=64)
        if arch == "qwen2_moe"
        else models[arch][0]
    )
    path = convert_to(hf.path, dtype=kind)
    ref, ref_tokens = hf_steps(quantized_moe(hf.model, kind), PROMPT * 2, 4)
    dense, tokens = flash_steps(FlashModel.open(path, strategy="dense"), PROMPT * 2, 4)
    scale = max(1.0, ref.abs().max().item())
    assert (dense - ref).abs().max().item() <= 1e-3 * scale and tokens == ref_tokens
    for opts in ({"strategy": "naive"}, {"strategy": "flash", "memory": expert_budget(path, 0.3), "window": 1}):
        got, _ = flash_steps(FlashModel.open(path, **opts), PROMPT * 2, 4)
        assert (got - dense).abs().max().item() <= 1e-4 * scale, opts


def test_verify_checks_an_expert_store(models, tmp_path, capsys):
    import shutil

    _, path = models["qwen2_moe"]
    assert main(["verify", str(path)]) == 0
    bad = tmp_path / "bad.llmflash"
    shutil.copytree(path, bad)
    flip_bit(bad / "ffn.bin", Store(bad).layers[1].offset + 100)
    capsys.readouterr()
    assert main(["verify", str(bad)]) != 0
    out = capsys.readouterr()
    assert "ffn.bin" in out.out + out.err
