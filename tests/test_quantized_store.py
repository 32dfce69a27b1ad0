"""Quantized stores (q8_0, q4_0, q4_1; issue 18): files, bundle sizes, `verify`, and logits
against an independent reference: transformers (OpenELM: the reference forward) with every weight
the store quantizes replaced by gguf.quants' own round trip (quantize, dequantize) of it, in
float32. The store quantizes every matrix along its rows, the FFN's down matrix too (in blocks of
32 neurons, as GGUF files hold it; store/layout.py), its neurons padded with zeros to a multiple
of 32, so the reference rounds down_proj padded the same way."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import tiny_tokenizer_json
from gguf_builders import GGML, KINDS, byte_level_vocab, hf_weights, rt, rt_padded, write_tiny_gguf
from openelm_builders import V as ELM_V
from openelm_builders import hf_config, random_weights, ref_forward, save_openelm
from safetensors import safe_open
from store_builders import calibrate_args, edit_manifest, permute_store, rebuild_crcs, reseal, run_cli, shadow_args

from llmflash.api import FlashModel
from llmflash.convert.gguf import convert_gguf
from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError, StoreError
from llmflash.models.quant import BLOCK_BYTES, QTensor
from llmflash.store import Store
from llmflash.strategies.dense import load_dense
from llmflash.verify import verify_store

VARIANTS = {
    "llama_gqa": ("llama", {}),
    "opt_pre_ln": ("opt", {}),
    "opt_post_ln": ("opt", dict(do_layer_norm_before=False)),
    "opt_proj": ("opt", dict(word_embed_proj_dim=32)),
}
PROMPT_LEN = 20  # >= UPCAST_ROWS: the prompt takes the dequantize-blocks path, decode the kernels


def quantized_reference(model: torch.nn.Module, kind: str, keep: tuple[str, ...] = ()) -> torch.nn.Module:
    """A float32 copy of the transformers model with every 2-D weight rounded as the store does
    (but those whose names end with one of `keep`: already in the store's blocks)."""
    ref = copy.deepcopy(model)
    if any(p.dtype != torch.float32 for p in ref.parameters()):
        ref = ref.float()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # tied weights appear once
            if p.dim() != 2 or name.endswith(keep):
                continue
            p.copy_(rt_padded(p, kind) if name.endswith(("down_proj.weight", "fc2.weight")) else rt(p, kind))
    return ref.eval()


def prompt(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (PROMPT_LEN,), generator=torch.Generator().manual_seed(seed))


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = max(1.0, ref.abs().max().item())
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-3 * scale


def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position, computed one token at a time through the KV cache."""
    cache = model.new_cache(len(ids))
    return torch.cat([model.forward(ids[t : t + 1], cache) for t in range(len(ids))])


def convert_quiet(src: Path, dst: Path, kind: str, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no tokenizer.json"
        return convert_hf(src, dst, dtype=kind, **kw)


@pytest.fixture(scope="module", params=[(v, k) for v in VARIANTS for k in KINDS], ids=lambda p: f"{p[0]}-{p[1]}")
def hf_store(request, make_hf, tmp_path_factory):
    variant, kind = request.param
    arch, kw = VARIANTS[variant]
    hf = make_hf(variant, arch, **kw)
    dst = convert_quiet(hf.path, tmp_path_factory.mktemp("q") / "m.llmflash", kind)
    return hf, dst, kind


# -- the files ----------------------------------------------------------------------------------
def test_files_sizes_and_verify(hf_store):
    hf, dst, kind = hf_store
    m = json.loads((dst / "manifest.json").read_text())
    assert (m["version"], m["dtype"]) == (6, kind)
    store = Store(dst)
    c = store.config
    rows_before_down = 2 if c.gated else 1
    down = c.dim if kind == "q8_0" else c.dim // 2
    for L in store.layers:
        assert L.bundle_bytes == rows_before_down * c.dim // 32 * BLOCK_BYTES[kind] + down + 4
    with safe_open(str(dst / "resident.safetensors"), framework="pt") as f:
        blocks = {name for name in f.keys() if f.get_tensor(name).dtype == torch.uint8}
        for name in f.keys():
            t = f.get_tensor(name)
            if name in m["quantized"]:
                rows, cols = m["quantized"][name]
                assert t.dtype == torch.uint8 and tuple(t.shape) == (rows, cols // 32 * BLOCK_BYTES[kind])
            elif name.endswith((".ffn.down_scale", ".ffn.down_min")):
                i = int(name.split(".")[1])
                assert t.dtype == torch.float16 and tuple(t.shape) == (-(-c.ffn_dims[i] // 32), c.dim), name
                assert name.endswith("down_scale") or kind == "q4_1"
            else:
                assert t.dim() == 1 and t.dtype == torch.float32, name
    from llmflash.store import expected_resident

    matrices = {name for name, shape in expected_resident(c).items() if len(shape) == 2}
    assert set(m["quantized"]) == blocks == matrices  # every matrix in blocks, and only those
    assert isinstance(store.resident()["layers.0.attn.q.weight"], QTensor)
    report = verify_store(dst, progress=False)
    assert report.bundles == sum(L.n_neurons for L in store.layers)


# -- the logits ---------------------------------------------------------------------------------
def test_prefill_and_decode_match_quantized_reference(hf_store):
    hf, dst, kind = hf_store
    ref_model = quantized_reference(hf.model, kind)
    ids = prompt()
    with torch.no_grad():
        ref = ref_model(ids[None]).logits[0].float()
    model, _ = load_dense(dst)
    assert_close(model.forward(ids, model.new_cache(PROMPT_LEN)), ref)  # prefill
    assert_close(decode_logits(model, ids), ref)  # one token at a time


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln"])
def test_naive_matches_dense(variant, make_hf, tmp_path):
    arch, kw = VARIANTS[variant]
    dst = convert_quiet(make_hf(variant, arch, **kw).path, tmp_path / "m.llmflash", "q4_0")
    dense = FlashModel.open(dst, strategy="dense")
    naive = FlashModel.open(dst, strategy="naive")
    ids = prompt(3).tolist()
    assert_close(naive.logits(ids), dense.logits(ids))
    assert list(naive.generate_ids(ids[:5], 6)) == list(dense.generate_ids(ids[:5], 6))


@pytest.mark.parametrize("kind", KINDS)
def test_permuted_store_equals_original(kind, make_hf, tmp_path):
    """A quantized store whose neurons are kept in a random order (the manifest's `order`; OPT's
    fc1 biases permuted alike): each bundle's down group travels with it, so dense, naive and
    flash (half the FFN cached, the oracle) give the unpermuted store's dense logits."""
    src = convert_quiet(make_hf("opt_pre_ln", "opt").path, tmp_path / "m.llmflash", kind)
    path = permute_store(src, tmp_path / "perm.llmflash")
    assert Store(path).layers[0].order is not None
    verify_store(path, progress=False)  # every group is its neuron's
    ids = prompt(7).tolist()
    ref = FlashModel.open(src, strategy="dense").logits(ids)
    from llmflash.strategies.flash.setup import model_bytes

    resident, ffn = model_bytes(Store(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the oracle is outside the budget
        for strategy, opts in (
            ("dense", {}),
            ("naive", {}),
            ("flash", dict(memory=f"{resident + ffn // 2}B", sparsity="oracle")),
        ):
            assert_close(FlashModel.open(path, strategy=strategy, **opts).logits(ids), ref)


@pytest.mark.parametrize("variant", ["llama_gqa", "opt_pre_ln"])
@pytest.mark.parametrize("share", [2.0, 0.5])
def test_flash_matches_dense(variant, share, make_hf, tmp_path):
    """flash over every neuron (sparsity "all") with the cache holding all of them (share 2) or
    about half (the rest streamed through the overflow area each token): dense's logits, at
    prefill and one token at a time (cache rows picked in place by the quantized kernel)."""
    from llmflash.strategies.flash.setup import SCRATCH_NEURONS, model_bytes

    arch, kw = VARIANTS[variant]
    dst = convert_quiet(make_hf(variant, arch, **kw).path, tmp_path / "m.llmflash", "q4_1")
    store = Store(dst)
    resident, ffn = model_bytes(store)
    budget = resident + SCRATCH_NEURONS * store.layers[0].bundle_bytes + int(share * ffn)
    dense = FlashModel.open(dst, strategy="dense")
    flash = FlashModel.open(dst, strategy="flash", sparsity="all", memory=f"{budget / 1000:.3f}KB")
    ids = prompt(6)
    assert_close(flash.logits(ids.tolist()), dense.logits(ids.tolist()))
    assert_close(decode_logits(flash.model, ids), decode_logits(dense.model, ids))
    assert flash.stats()["bytes_read"] > 0


@pytest.mark.parametrize("how", ["lowrank", "shadow"])
def test_calibrate_flash_hot_eval(how, make_hf, texts, tmp_path):
    """The whole flash workflow on a quantized store: calibrate (the FFN dequantized for the
    offline step), flash with the predictors and hot neurons, eval, verify."""
    calib, held = texts
    (tok := tmp_path / "tok").mkdir()
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json())
    dst = tmp_path / "m.llmflash"
    r = run_cli("convert", str(make_hf("opt_pre_ln", "opt").path), str(dst), "--dtype", "q8_0", "--tokenizer", str(tok))
    assert r.returncode == 0, r.stderr
    r = run_cli(*(calibrate_args if how == "lowrank" else shadow_args)(dst, calib))
    assert r.returncode == 0, r.stderr
    flash = ("--strategy", "flash", "--memory", "2x", "--hot", "0.3")
    r = run_cli("generate", str(dst), "-p", "t5 t7 t9", "-n", "4", *flash)
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", str(dst), "--text", str(held), "--tokens", "150")
    assert r.returncode == 0, r.stderr
    assert run_cli("verify", str(dst)).returncode == 0


@pytest.mark.parametrize("kind", KINDS)
def test_openelm(kind, tmp_path):
    w = random_weights(seed=2)
    src = save_openelm(tmp_path / "hf", hf_config(), w)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json(ELM_V))
    dst = convert_quiet(src, tmp_path / "elm.llmflash", kind, tokenizer=tok)
    rw = {}
    for name, t in w.items():
        if t.dim() != 2:
            rw[name] = t
        else:
            rw[name] = rt(t, kind)
    ids = torch.randint(0, ELM_V, (PROMPT_LEN,), generator=torch.Generator().manual_seed(5))
    ref = ref_forward(rw, ids)
    model, store = load_dense(dst)
    down = 128 if kind == "q8_0" else 64
    assert [L.bundle_bytes for L in store.layers] == [2 * 128 // 32 * BLOCK_BYTES[kind] + down + 4] * len(store.layers)
    assert_close(model.forward(ids, model.new_cache(PROMPT_LEN)), ref)
    assert_close(decode_logits(model, ids), ref)
    verify_store(dst, progress=False)


# GGUF tensors kept byte for byte: resident matrices in any of the three formats (the builder's
# Q8_0 embeddings, Q4_1 q), FFN gate/up only in the store's own (Q8_0 gate, Q4_0 up)
GGUF_KEPT = {
    "q8_0": {"token_embd": "embed_tokens.weight", "attn_q": "q_proj.weight", "ffn_gate": "gate_proj.weight"},
    "q4_1": {"token_embd": "embed_tokens.weight", "attn_q": "q_proj.weight"},
    "q4_0": {"token_embd": "embed_tokens.weight", "attn_q": "q_proj.weight", "ffn_up": "up_proj.weight"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_source(kind, tmp_path):
    """A GGUF source (tests/gguf_builders: Q8_0 embeddings and gate, Q4_1 q, Q4_0 up, others in
    other types; for q4_0 and q4_1 the FFN's down in the store's kind too): the tensors already in
    the store's kind keep their blocks (no second rounding), down_proj's split into the bundles'
    raw integers and the resident scales, the rest are rounded once from their values; logits
    match transformers' GGUF loader with the same rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    src = tmp_path / "tiny.gguf"
    down_kept = kind != "q8_0"  # q8_0: down stays Q5_1 in the file, rounded once into q8_0
    override = None
    if down_kept:
        w = hf_weights(len(byte_level_vocab()[0]), 0)
        override = {f"blk.{i}.ffn_down.weight": (w[f"{i}.down"], GGML[kind]) for i in range(2)}
    write_tiny_gguf(src, override=override)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    dst = convert_gguf(src, tmp_path / f"{kind}.llmflash", dtype=kind)
    kept = GGUF_KEPT[kind]
    reader = gguf.GGUFReader(src)
    raw = {t.name: np.asarray(t.data) for t in reader.tensors}
    store = Store(dst)
    res = store.resident()
    if "token_embd" in kept:
        assert np.array_equal(res["embed.weight"].data.numpy(), raw["token_embd.weight"])
        assert res["embed.weight"].kind == "q8_0"
        want_entry = [266, 64] if kind == "q8_0" else [266, 64, "q8_0"]
        assert store.manifest["quantized"]["embed.weight"] == want_entry
    if "attn_q" in kept:  # rows unpermuted (llama.cpp's Q/K order), each row's blocks as they were
        q = raw["blk.0.attn_q.weight"]
        want = q.reshape(4, 64 // 4 // 2, 2, -1).swapaxes(1, 2).reshape(q.shape)
        assert np.array_equal(res["layers.0.attn.q.weight"].data.numpy(), want)
    rb = 64 // 32 * BLOCK_BYTES[kind]
    rows = store.read_layer(0).numpy()
    if "ffn_gate" in kept:
        assert np.array_equal(rows[:, :rb], raw["blk.0.ffn_gate.weight"])
    if "ffn_up" in kept:
        assert np.array_equal(rows[:, rb : 2 * rb], raw["blk.0.ffn_up.weight"])
    keep = tuple(kept.values())
    if down_kept:  # the file's down blocks, rebuilt from the bundles and the scales, byte for byte
        assert np.array_equal(join_down(store, 0), raw["blk.0.ffn_down.weight"])
        keep += ("down_proj.weight",)
    ids = torch.tensor([1, 40, 41, 260, 5, 77, 2, 100] * 3)
    with torch.no_grad():
        ref = quantized_reference(hf, kind, keep=keep)(ids[None]).logits[0]
    model, _ = load_dense(dst)
    assert_close(model.forward(ids, model.new_cache(len(ids))), ref)
    assert_close(decode_logits(model, ids[:8]), ref[:8])


def join_down(store: Store, i: int) -> np.ndarray:
    """Layer i's down_proj as GGML blocks along its rows, (dim, n/32 * block_bytes) uint8, put
    together here from the bundles' raw integers and the resident scales (the layout's own
    definition, store/layout.py), in original neuron order."""
    kind, D = store.quant, store.config.dim
    rows = store.read_layer(i).numpy()
    n = rows.shape[0]
    fields_before = 2 if store.config.gated else 1
    start = fields_before * D // 32 * BLOCK_BYTES[kind]
    down = rows[:, start : start + (D if kind == "q8_0" else D // 2)]
    group = rows[:, -4:].copy().view("<u4")[:, 0]
    assert np.array_equal(group, np.arange(n) // 32)
    q = store.q_bundles(i)
    d = q.down_scale.numpy().T  # (D, groups)
    if kind == "q8_0":
        vals = down.T.reshape(D, n // 32, 32)  # row r, group, neuron in group
    else:
        nib = np.stack([down & 15, down >> 4], axis=-1)  # (n, D/2, 2): low = row k, high = row k + 16
        per = nib.reshape(n, D // 32, 16, 2).transpose(0, 1, 3, 2).reshape(n, D)  # (n, D) values
        vals = per.T.reshape(D, n // 32, 32)
        vals = (vals[:, :, :16] | (vals[:, :, 16:] << 4)).astype(np.uint8)
    head = [d.astype(np.float16)[:, :, None].view(np.uint8)]
    if kind == "q4_1":
        head.append(q.down_min.numpy().T.astype(np.float16)[:, :, None].view(np.uint8))
    blocks = np.concatenate([h.reshape(D, n // 32, 2) for h in head] + [vals.view(np.uint8)], axis=2)
    return blocks.reshape(D, -1)


def test_ffn_width_not_a_multiple_of_32(make_hf, tmp_path):
    """n = 80 neurons: the last down group holds 16 zero neurons (the padding), and the logits
    still match the reference (down_proj padded the same way)."""
    hf = make_hf("llama_ffn80", "llama", intermediate_size=80)
    for kind in KINDS:
        dst = convert_quiet(hf.path, tmp_path / f"{kind}.llmflash", kind)
        store = Store(dst)
        assert tuple(store.q_bundles(0).down_scale.shape) == (3, store.config.dim)
        ids = prompt(2)
        with torch.no_grad():
            ref = quantized_reference(hf.model, kind)(ids[None]).logits[0].float()
        model, _ = load_dense(dst)
        assert_close(model.forward(ids, model.new_cache(PROMPT_LEN)), ref)
        assert_close(decode_logits(model, ids), ref)


# -- sizes ----------------------------------------------------------------------------------------
def test_force_replaces_a_quantized_store(make_hf, tmp_path):
    src = make_hf("llama_gqa", "llama").path
    dst = convert_quiet(src, tmp_path / "m.llmflash", "q4_0")
    convert_quiet(src, dst, "q8_0", force=True)
    assert Store(dst).quant == "q8_0"


def test_smaller_than_float16(make_hf, tmp_path):
    src = make_hf("llama_gqa", "llama").path
    f16 = convert_quiet(src, tmp_path / "f16.llmflash", "float16")
    size = lambda p: sum(f.stat().st_size for f in p.iterdir())  # noqa: E731
    for kind in KINDS:
        q = convert_quiet(src, tmp_path / f"{kind}.llmflash", kind)
        assert size(q) < size(f16)


# -- bad inputs -------------------------------------------------------------------------------------
def test_width_not_multiple_of_32(make_hf, tmp_path):
    hf = make_hf("llama_w48", "llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ConvertError, match="multiple of 32"):
        convert_quiet(hf.path, tmp_path / "m.llmflash", "q8_0")
    assert not (tmp_path / "m.llmflash").exists()


def test_cli_convert_generate_and_bad_width(make_hf, tmp_path):
    hf = make_hf("llama_gqa", "llama")
    (tok := tmp_path / "tok").mkdir()
    (tok / "tokenizer.json").write_text(tiny_tokenizer_json())
    dst = tmp_path / "cli.llmflash"
    r = run_cli("convert", str(hf.path), str(dst), "--dtype", "q4_0", "--tokenizer", str(tok))
    assert r.returncode == 0, r.stderr
    r = run_cli("generate", str(dst), "-p", "t5 t7 t9", "-n", "4", "--strategy", "dense")
    assert r.returncode == 0, r.stderr
    bad = make_hf("llama_w48", "llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    r = run_cli("convert", str(bad.path), str(tmp_path / "bad.llmflash"), "--dtype", "q4_1", "--tokenizer", str(tok))
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "multiple of 32" in r.stderr


@pytest.fixture(scope="module")
def pristine_q(make_hf, tmp_path_factory) -> Path:
    return convert_quiet(make_hf("opt_pre_ln", "opt").path, tmp_path_factory.mktemp("pq") / "m.llmflash", "q4_1")


@pytest.fixture
def qstore(pristine_q, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine_q, tmp_path / "m.llmflash"))


HOSTILE = {
    "unknown dtype": (lambda m: m.update(dtype="q5_k"), "dtype"),
    "float dtype at version 6": (lambda m: m.update(dtype="float16"), "dtype"),
    "the first quantized layout (version 5)": (lambda m: m.update(version=5), "convert the model again"),
    "quantized dtype at version 4": (lambda m: m.update(version=4), "version"),
    "no quantized list": (lambda m: m.pop("quantized"), "quantized"),
    "quantized not an object": (lambda m: m.update(quantized=[1, 2]), "quantized"),
    "unknown name": (lambda m: m["quantized"].update({"layers.9.attn.q.weight": [64, 64]}), "unknown"),
    "missing name": (lambda m: m["quantized"].pop("embed.weight"), "lacks"),
    "wrong shape": (lambda m: m["quantized"].update({"embed.weight": [128, 32]}), "config says"),
    "shape not a pair": (lambda m: m["quantized"].update({"embed.weight": [128, 64.0]}), "rows, cols"),
    "unknown kind": (lambda m: m["quantized"].update({"embed.weight": [128, 64, "q5_k"]}), "kind one of"),
    "four entries": (lambda m: m["quantized"].update({"embed.weight": [128, 64, "q8_0", 1]}), "rows, cols"),
    "bool in shape": (lambda m: m["quantized"].update({"embed.weight": [True, 64]}), "rows, cols"),
    "wrong bundle size": (lambda m: m["layers"][0].update(bundle_bytes=m["layers"][0]["bundle_bytes"] + 20), "bundle"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest(qstore, case):
    fn, words = HOSTILE[case]
    edit_manifest(qstore, fn)
    reseal(qstore)
    with pytest.raises(StoreError, match=words) as e:
        Store(qstore).resident()
    assert "manifest.json" in str(e.value)


def test_other_kind_entry_must_match_the_bytes(qstore):
    """An entry naming another kind than the U8 tensor's byte width: a StoreError, not a misread."""
    edit_manifest(qstore, lambda m: m["quantized"].update({"embed.weight": [128, 64, "q8_0"]}))
    reseal(qstore)
    with pytest.raises(StoreError, match="block count"):
        Store(qstore).resident()


def test_wrong_block_count_in_resident(qstore):
    """A U8 tensor one block short per row: a StoreError naming resident.safetensors."""
    from safetensors.torch import load_file, save_file

    path = qstore / "resident.safetensors"
    t = load_file(str(path))
    t["layers.0.attn.q.weight"] = t["layers.0.attn.q.weight"][:, :-20].contiguous()
    save_file(t, str(path), metadata={"format": "llmflash-store"})
    reseal(qstore)
    with pytest.raises(StoreError, match="block count") as e:
        Store(qstore).resident()
    assert "resident.safetensors" in str(e.value)


def test_nan_scale_in_resident(qstore):
    from safetensors.torch import load_file, save_file

    path = qstore / "resident.safetensors"
    t = load_file(str(path))
    w = t["embed.weight"].clone()
    w[3, 0:2] = torch.tensor([0x00, 0x7E], dtype=torch.uint8)  # float16 NaN as block 0's scale
    t["embed.weight"] = w
    save_file(t, str(path), metadata={"format": "llmflash-store"})
    reseal(qstore)
    with pytest.raises(StoreError, match="non-finite"):
        Store(qstore).resident()


@pytest.mark.parametrize("name", ["layers.1.ffn.down_scale", "layers.0.ffn.down_min"])
def test_bad_down_scales(qstore, name):
    """A down-scale table missing, of the wrong shape or holding a NaN: a StoreError naming
    resident.safetensors, at load."""
    from safetensors.torch import load_file, save_file

    path = qstore / "resident.safetensors"
    pristine = load_file(str(path))
    for edit, words in (
        (lambda t: t.pop(name), "missing"),
        (lambda t: t.update({name: t[name][:-1].clone()}), "expected"),
        (lambda t: t.update({name: t[name].float()}), "expected F16"),
        (lambda t: t[name].__setitem__((0, 3), float("nan")), "non-finite"),
    ):
        t = {k: v.clone() for k, v in pristine.items()}
        edit(t)
        save_file(t, str(path), metadata={"format": "llmflash-store"})
        reseal(qstore)
        with pytest.raises(StoreError, match=words) as e:
            Store(qstore).q_bundles(int(name.split(".")[1]))
        assert "resident.safetensors" in str(e.value)


@pytest.mark.parametrize("group", [999, 1])
def test_bundle_naming_a_wrong_group(qstore, group):
    """A bundle whose group (its last 4 bytes) is not its neuron's (out of range, or another
    group's in range), with every CRC recomputed to match: `verify` and `dense` name the layer,
    bundle and ffn.bin; the kernel itself refuses an out-of-range one (no read out of bounds)."""
    store = Store(qstore)
    L = store.layers[0]
    with open(qstore / "ffn.bin", "r+b") as f:
        f.seek(L.offset + 5 * L.bundle_bytes - 4)
        f.write(np.uint32(group).tobytes())
    rebuild_crcs(qstore)
    words = f"layer 0's bundle 4 .neuron 4. names down group {group}, not 0"
    with pytest.raises(StoreError, match=words) as e:
        verify_store(qstore, progress=False)
    assert "ffn.bin" in str(e.value)
    with pytest.raises(StoreError, match=words):
        load_dense(qstore)
    rows = Store(qstore).read_layer(0)
    x = torch.randn(1, L.fields[0][1])
    if group == 999:
        with pytest.raises(ValueError, match="bundle 4 names down group 999"):
            Store(qstore).q_bundles(0).ffn(x[0], rows, None, None, 1)


def test_truncated_ffn(qstore):
    p = qstore / "ffn.bin"
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 100)
    with pytest.raises(StoreError, match="ffn.bin"):
        Store(qstore)


def test_prefill_in_many_row_blocks(hf_store, monkeypatch):
    """Prefill dequantizes at most DEQUANT_BYTES of rows at a time: with a tiny limit every
    matrix and FFN goes in many blocks, and the logits stay the same."""
    hf, dst, kind = hf_store
    model, _ = load_dense(dst)
    ids = prompt(4)
    whole = model.forward(ids, model.new_cache(PROMPT_LEN))
    monkeypatch.setattr("llmflash.models.quant.DEQUANT_BYTES", 4 * 64 * 5)
    assert_close(model.forward(ids, model.new_cache(PROMPT_LEN)), whole)
