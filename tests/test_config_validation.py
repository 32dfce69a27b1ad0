"""Hostile configs, orders, JSON and resident dtypes: each is a StoreError (or, from config.json,
a ConvertError) naming the file and the field, never a TypeError/KeyError/RuntimeError later or a
run that prints NaN-driven garbage with exit code 0. Small stores: the file runs in seconds."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import store_builders
import torch
from conftest import tiny_tokenizer_json
from safetensors.torch import load_file, save_file
from store_builders import reseal, write_store

from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError, StoreError
from llmflash.models.config import ModelConfig
from llmflash.models.layers import rope_inv_freq
from llmflash.store import Store, write_manifest
from llmflash.strategies.dense import load_dense

NAN, INF = float("nan"), float("inf")
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def tiny_config(**kw) -> ModelConfig:
    """store_builders.tiny_config with a BOS token id."""
    return store_builders.tiny_config(**{"bos_token_id": 0, **kw})


def opt_config(**kw) -> ModelConfig:
    """store_builders.opt_config with a BOS token id."""
    return store_builders.opt_config(**{"bos_token_id": 0, **kw})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    return {"llama": write_store(root / "llama", tiny_config()), "opt": write_store(root / "opt", opt_config())}


def copy(pristine: dict[str, Path], kind: str, tmp_path: Path) -> Path:
    dst = tmp_path / f"{kind}.llmflash"
    shutil.copytree(pristine[kind], dst)
    return dst


def edit_manifest(store: Path, fn) -> Path:
    """Apply `fn` to the manifest and write it back with a matching manifest_crc32 (NaN / Infinity
    are written as JSON's extensions)."""
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    write_manifest(store, m)
    return path


def assert_names(e: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def first_logits(store: Path) -> torch.Tensor:
    model, _ = load_dense(store)
    return model.forward(torch.tensor([1, 2, 3]), model.new_cache(8))


# -- ModelConfig.validate through a hostile manifest --------------------------------------------------
CONFIG_CASES = [
    ("llama", "rope_theta", 0),
    ("llama", "rope_theta", -1.0),
    ("llama", "rope_theta", NAN),
    ("llama", "rope_theta", INF),
    ("llama", "rope_theta", "x"),
    ("llama", "rope_theta", True),
    ("llama", "rope_theta", 10**400),
    ("llama", "rope_theta", None),  # no RoPE, no learned positions
    ("llama", "norm_eps", NAN),
    ("llama", "norm_eps", -1e-5),
    ("llama", "norm_eps", 0.0),
    ("llama", "norm_eps", INF),
    ("llama", "norm_eps", "x"),
    ("llama", "norm_eps", 2.0),
    ("llama", "rope_scaling", {"rope_type": "linear"}),
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": "x"}),
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": 0}),
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": NAN}),
    ("llama", "rope_scaling", {"rope_type": "linear", "factor": 2.0, "fctor": 3.0}),
    ("llama", "rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
    ("llama", "rope_scaling", {**LLAMA3, "high_freq_factor": 0.5}),
    ("llama", "rope_scaling", {**LLAMA3, "original_max_position_embeddings": "x"}),
    ("llama", "rope_scaling", {**LLAMA3, "low_freq_factor": True}),
    ("llama", "eos_token_ids", 5),
    ("llama", "eos_token_ids", [[1]]),
    ("llama", "eos_token_ids", [64]),
    ("llama", "eos_token_ids", [-1]),
    ("llama", "eos_token_ids", [True]),
    ("llama", "eos_token_ids", [1.0]),
    ("llama", "bos_token_id", "x"),
    ("llama", "bos_token_id", 64),
    ("llama", "bos_token_id", -1),
    ("llama", "bos_token_id", True),
    ("llama", "head_dim", 7),
    ("llama", "gated", "no"),
    ("llama", "tie_embeddings", 1),
    ("llama", "attn_bias", "false"),
    ("llama", "qk_norm", None),
    ("llama", "final_norm", 0),
    ("llama", "pre_norm", "yes"),
    ("llama", "name", 5),
    ("opt", "pos_offset", -2),
    ("opt", "pos_offset", "2"),
    ("opt", "pos_offset", 2.0),
    ("opt", "learned_pos", "true"),
    ("opt", "ffn_bias", 1),
]


@pytest.mark.parametrize("kind,field,value", CONFIG_CASES, ids=[f"{k}-{f}={v!r:.30}" for k, f, v in CONFIG_CASES])
def test_bad_config_field(pristine, tmp_path, kind, field, value):
    store = copy(pristine, kind, tmp_path)
    mpath = edit_manifest(store, lambda m: m["config"].update({field: value}))
    with pytest.raises(StoreError) as e:
        Store(store)
    assert_names(e, mpath, field)


def write_unchecked(dst: Path, config: ModelConfig) -> Path:
    """A store whose resident tensors match a config validate() refuses (as a hostile writer
    would make it): validation is switched off while it is written."""
    orig = ModelConfig.validate
    ModelConfig.validate = lambda self: None  # type: ignore[method-assign]
    try:
        return write_store(dst, config)
    finally:
        ModelConfig.validate = orig  # type: ignore[method-assign]


@pytest.mark.parametrize(
    "config,field",
    [
        (tiny_config(head_dim=7), "head_dim"),  # was: RuntimeError inside RoPE
        (opt_config(pos_offset=-2, max_positions=130), "pos_offset"),  # was: RuntimeError/IndexError
        (tiny_config(rope_theta=0.0), "rope_theta"),  # was: NaN logits
        (tiny_config(norm_eps=NAN), "norm_eps"),  # was: NaN logits
    ],
    ids=["odd-head-dim", "negative-pos-offset", "theta-0", "eps-nan"],
)
def test_consistent_store_with_bad_config(tmp_path, config, field):
    store = write_unchecked(tmp_path / "s.llmflash", config)
    with pytest.raises(StoreError) as e:
        first_logits(store)
    assert_names(e, store / "manifest.json", field)


@pytest.mark.parametrize(
    "changes",
    [
        dict(norm_eps=1e-12),
        dict(norm_eps=1.0),
        dict(rope_theta=1.0),
        dict(rope_theta=5e5),
        dict(rope_scaling={"rope_type": "linear", "factor": 2}),
        dict(rope_scaling=dict(LLAMA3)),
        dict(rope_scaling={"rope_type": "default"}),
        dict(bos_token_id=None, eos_token_ids=[]),
        dict(bos_token_id=63, eos_token_ids=[0, 63]),
        dict(head_dim=6),
    ],
    ids=lambda c: ",".join(f"{k}={v!r:.20}" for k, v in c.items()),
)
def test_good_configs_still_run(tmp_path, changes):
    logits = first_logits(write_store(tmp_path / "s.llmflash", tiny_config(**changes)))
    assert logits.shape == (3, 64) and bool(torch.isfinite(logits).all())


def test_opt_and_half_stores_still_run(tmp_path):
    assert bool(torch.isfinite(first_logits(write_store(tmp_path / "o", opt_config()))).all())
    for dtype in ("float16", "bfloat16"):
        store = write_store(tmp_path / dtype, opt_config(), dtype)
        assert bool(torch.isfinite(first_logits(store)).all())
        assert all(b is not None and b.dtype == torch.float32 for b in Store(store).up_biases())


def test_rope_inv_freq_names_missing_key():
    """A rope_scaling that reaches the model code unvalidated is a ValueError naming the key."""
    with pytest.raises(ValueError, match="factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "linear"})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope_inv_freq(8, 10000.0, {"rope_type": "llama3", "factor": 8.0})


# -- layers[i].order ---------------------------------------------------------------------------------
ORDERS = {
    "string": ["a"] + list(range(47)),
    "floats": [float(i) for i in range(48)],
    "bools": [False, True] + list(range(2, 48)),
    "float-entry": [0.0] + list(range(1, 48)),
    "nested": [[0]] + list(range(1, 48)),
    "none-entry": [None] + list(range(1, 48)),
}


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_bad_order(pristine, tmp_path, name):
    store = copy(pristine, "llama", tmp_path)

    def put(m):
        m["layers"][0]["order"] = ORDERS[name]

    mpath = edit_manifest(store, put)
    with pytest.raises(StoreError) as e:
        Store(store)
    assert_names(e, mpath, "layers[0].order", "permutation")


def test_good_order_still_opens(pristine, tmp_path):
    store = copy(pristine, "llama", tmp_path)
    perm = list(range(48))[::-1]
    edit_manifest(store, lambda m: m["layers"][0].update(order=perm))
    assert Store(store).layers[0].order == tuple(perm)


# -- JSON the parser cannot take ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "[" * 200000,
        '{"a": ' * 100000,
        "[" * 200000 + "]" * 200000,
        '{"format": "llmflash-store", "x": ' + "[" * 100000 + "]" * 100000 + "}",
    ],
    ids=["open-arrays", "open-objects", "closed-arrays", "deep-value"],
)
def test_deeply_nested_manifest(pristine, tmp_path, text):
    store = copy(pristine, "llama", tmp_path)
    (store / "manifest.json").write_text(text)
    with pytest.raises(StoreError) as e:
        Store(store)
    assert_names(e, store / "manifest.json", "nested")


# -- resident tensor dtypes --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,name,dtype",
    [
        ("llama", "embed.weight", torch.int64),
        ("llama", "layers.0.attn.q.weight", torch.uint8),
        ("llama", "layers.1.attn_norm.weight", torch.float16),
        ("llama", "norm.weight", torch.float64),
        ("llama", "layers.1.attn.o.weight", torch.bfloat16),
        ("opt", "layers.0.ffn.up_bias", torch.int64),
        ("opt", "pos_embed.weight", torch.int32),
        ("opt", "layers.1.ffn_norm.bias", torch.uint8),
    ],
)
def test_resident_dtype(pristine, tmp_path, kind, name, dtype):
    store = copy(pristine, kind, tmp_path)
    rpath = store / "resident.safetensors"
    t = load_file(str(rpath))
    t[name] = (t[name] * 10).to(dtype)
    save_file(t, str(rpath), metadata={"format": "llmflash-store"})
    reseal(store)  # meet the dtype check behind the checksum
    with pytest.raises(StoreError) as e:
        Store(store).resident()
    assert_names(e, rpath, name, str(dtype).removeprefix("torch."), "float32")
    if name.endswith("up_bias"):  # read apart by the FFN strategies
        with pytest.raises(StoreError) as e:
            Store(store).up_biases()
        assert_names(e, rpath, name, "I64", "F32")


def test_whole_store_in_another_dtype(pristine, tmp_path):
    """Every tensor float16 while the manifest says float32: refused, not silently reinterpreted."""
    store = copy(pristine, "llama", tmp_path)
    rpath = store / "resident.safetensors"
    save_file({k: v.half() for k, v in load_file(str(rpath)).items()}, str(rpath))
    reseal(store)
    with pytest.raises(StoreError) as e:
        Store(store).resident()
    assert_names(e, rpath, "float16", "expected float32")


# -- the CLI: exit code 2, one line, no traceback ---------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmflash", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")},
    )


@pytest.mark.parametrize("what", ["rope_theta", "resident-dtype"])
def test_cli_exit_2(pristine, tmp_path, what):
    store = copy(pristine, "llama", tmp_path)
    (store / "tokenizer.json").write_text(tiny_tokenizer_json(64))
    reseal(store)  # recorded as if converted with it
    if what == "rope_theta":
        edit_manifest(store, lambda m: m["config"].update(rope_theta=0))
        where = "manifest.json"
    else:
        rpath = store / "resident.safetensors"
        t = load_file(str(rpath))
        t["embed.weight"] = t["embed.weight"].to(torch.int64)
        save_file(t, str(rpath))
        reseal(store)
        what, where = "embed.weight", "resident.safetensors"
    r = run_cli("generate", str(store), "-p", "t1 t2", "-n", "2")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and where in lines[0] and what in lines[0], r.stderr


# -- the HF converter: the same checks on config.json ----------------------------------------------
def clone_hf(src: Path, tmp: Path, **changes) -> Path:
    dst = tmp / "src"
    shutil.copytree(src, dst)
    path = dst / "config.json"
    c = json.loads(path.read_text())
    c.update(changes)
    path.write_text(json.dumps(c))
    return dst


HF_CASES = [
    (dict(rope_theta=0), "rope_theta"),
    (dict(rope_theta=-1e4), "rope_theta"),
    (dict(rope_theta=NAN), "rope_theta"),
    (dict(rope_theta=INF), "rope_theta"),
    (dict(rope_theta=0.5), "rope_theta"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(rms_norm_eps=-1e-6), "rms_norm_eps"),
    (dict(rms_norm_eps=NAN), "rms_norm_eps"),
    (dict(rms_norm_eps=INF), "rms_norm_eps"),
    (dict(head_dim=15), "head_dim"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": "2"}), "factor"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": NAN}), "factor"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0.0}), "factor"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": True}), "factor"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope_theta"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": NAN}), "rope_theta"),
    (
        dict(rope_parameters={**LLAMA3, "rope_theta": 1e4, "original_max_position_embeddings": "64"}),
        "original_max_position_embeddings",
    ),
    (dict(rope_parameters={**LLAMA3, "rope_theta": 1e4, "factor": INF}), "factor"),
    (dict(rope_parameters=None, rope_theta=1e4, rope_scaling={"type": "linear", "factor": -2.0}), "factor"),
    (dict(eos_token_id=999), "eos_token_id"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(eos_token_id=[2, 128]), "eos_token_id"),
    (dict(bos_token_id=500), "bos_token_id"),
    (dict(bos_token_id="x"), "bos_token_id"),
    (dict(bos_token_id=True), "bos_token_id"),
]


@pytest.mark.parametrize(
    "changes,key", HF_CASES, ids=[",".join(f"{k}={v!r:.40}" for k, v in c.items()) for c, _ in HF_CASES]
)
def test_hf_bad_config_values(tmp_path, hf_llama, changes, key):
    src = clone_hf(hf_llama.path, tmp_path, **changes)
    with pytest.raises(ConvertError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_hf(src, tmp_path / "out")
    assert_names(e, src / "config.json", key)
    assert not (tmp_path / "out").exists()


def test_hf_generation_config_eos_beyond_vocab(tmp_path, hf_llama):
    src = clone_hf(hf_llama.path, tmp_path)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4096]}))
    with pytest.raises(ConvertError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_hf(src, tmp_path / "out")
    assert_names(e, src / "generation_config.json", "eos_token_id")


def test_hf_null_and_negative_token_ids_mean_none(tmp_path, hf_llama):
    src = clone_hf(hf_llama.path, tmp_path, bos_token_id=None, eos_token_id=[2, -1, None])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = Store(convert_hf(src, tmp_path / "out"))
    assert store.config.bos_token_id is None and store.config.eos_token_ids == [2]
    assert math.isfinite(store.config.rope_theta)
