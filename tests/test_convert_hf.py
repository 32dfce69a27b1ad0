"""convert_hf on good and bad Hugging Face folders: every bad input is a ConvertError (or
UnsupportedModelError) whose message names the offending file; a failed conversion leaves
nothing behind; sharded checkpoints, tokenizers and config variants convert."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import build_hf, tiny_tokenizer_json
from safetensors.torch import load_file, save_file

from llmflash.convert.hf import HFConfig, convert_hf
from llmflash.convert.hf_archs import _rope
from llmflash.convert.writer import StoreWriter
from llmflash.errors import ConvertError, UnsupportedModelError
from llmflash.store import Store
from llmflash.strategies.dense import load_dense


def clone(src: Path, tmp: Path) -> Path:
    dst = tmp / "src"
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    path = folder / "config.json"
    c = json.loads(path.read_text())
    for k in drop:
        c.pop(k, None)
    c.update(changes)
    path.write_text(json.dumps(c))
    return path


def edit_tensors(folder: Path, fn) -> Path:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def quiet_convert(src: Path, dst: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_hf(src, dst, **kw)


def assert_nothing_left(parent: Path, *keep: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep), "a destination or temp folder was left"


def logits(store: Path, n: int = 12) -> torch.Tensor:
    model, _ = load_dense(store)
    return model.forward(torch.arange(3, 3 + n), model.new_cache(n))


# -- bad inputs ---------------------------------------------------------------------------------------
def test_missing_source(tmp_path):
    with pytest.raises(ConvertError, match="no such file") as e:
        convert_hf(tmp_path / "absent", tmp_path / "out")
    assert str(tmp_path / "absent") in str(e.value)


def test_source_is_a_plain_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(ConvertError, match="not a Hugging Face model folder") as e:
        convert_hf(f, tmp_path / "out")
    assert str(f) in str(e.value)


def test_no_config_json(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    (src / "config.json").unlink()
    with pytest.raises(ConvertError, match="no config.json") as e:
        convert_hf(src, tmp_path / "out")
    assert str(src) in str(e.value)


@pytest.mark.parametrize(
    "text,match", [("{not json", "invalid JSON"), ("[1, 2]", "JSON object"), (b"\xff\xfe{}", "invalid JSON")]
)
def test_bad_config_json(tmp_path, hf_llama, text, match):
    src = clone(hf_llama.path, tmp_path)
    (src / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConvertError, match=match) as e:
        convert_hf(src, tmp_path / "out")
    assert str(src / "config.json") in str(e.value)


@pytest.mark.parametrize("model_type", ["gpt2", None, 7])
def test_unsupported_model_type(tmp_path, hf_llama, model_type):
    src = clone(hf_llama.path, tmp_path)
    cfg = edit_config(src, model_type=model_type)
    with pytest.raises(UnsupportedModelError, match="model_type") as e:
        convert_hf(src, tmp_path / "out")
    assert str(cfg) in str(e.value) and repr(model_type) in str(e.value)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "yarn"),
        (dict(model_type="mistral", sliding_window=4096), "sliding"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}), "partial"),
    ],
)
def test_unsupported_llama_options(tmp_path, hf_llama, changes, match):
    src = clone(hf_llama.path, tmp_path)
    cfg = edit_config(src, **changes)
    with pytest.raises(UnsupportedModelError, match=match) as e:
        convert_hf(src, tmp_path / "out")
    assert str(cfg) in str(e.value)


def test_unsupported_opt_activation(tmp_path, hf_opt):
    src = clone(hf_opt.path, tmp_path)
    cfg = edit_config(src, activation_function="gelu_new")
    with pytest.raises(UnsupportedModelError, match="gelu_new") as e:
        convert_hf(src, tmp_path / "out")
    assert str(cfg) in str(e.value)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(hidden_size=None), "hidden_size is missing"),
        (dict(num_hidden_layers="2"), "num_hidden_layers"),
        (dict(num_key_value_heads=3), "multiple"),
        (dict(rms_norm_eps="tiny"), "rms_norm_eps"),
    ],
)
def test_bad_config_values(tmp_path, hf_llama, changes, match):
    src = clone(hf_llama.path, tmp_path)
    cfg = edit_config(src, **changes)
    with pytest.raises(ConvertError, match=match) as e:
        convert_hf(src, tmp_path / "out")
    assert str(cfg) in str(e.value)


def test_missing_tensor_in_last_layer_leaves_nothing(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    st = edit_tensors(src, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ConvertError, match=r"missing tensor 'model\.layers\.1\.mlp\.down_proj\.weight'") as e:
        convert_hf(src, out / "model.llmflash")
    assert str(st) in str(e.value)
    assert_nothing_left(out)


def test_wrong_shape(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    st = edit_tensors(src, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ConvertError, match=r"k_proj\.weight.*\(64, 64\), expected \(32, 64\)") as e:
        convert_hf(src, tmp_path / "out")
    assert str(st) in str(e.value)


def test_quantized_tensor(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    st = edit_tensors(
        src, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(96, 64, dtype=torch.int8)})
    )
    with pytest.raises(UnsupportedModelError, match="I8") as e:
        convert_hf(src, tmp_path / "out")
    assert str(st) in str(e.value)


@pytest.mark.parametrize("keep", [20, 5000])
def test_truncated_safetensors(tmp_path, hf_llama, keep):
    src = clone(hf_llama.path, tmp_path)
    st = src / "model.safetensors"
    st.write_bytes(st.read_bytes()[:keep])
    with pytest.raises(ConvertError, match="unreadable safetensors") as e:
        convert_hf(src, tmp_path / "out")
    assert str(st) in str(e.value)


def test_no_safetensors(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(ConvertError, match="no \\*.safetensors.*pytorch_model.bin") as e:
        convert_hf(src, tmp_path / "out")
    assert str(src) in str(e.value)


def test_interrupted_conversion_leaves_nothing(tmp_path, hf_llama, monkeypatch):
    """A failure (or Ctrl-C) while the last layer is written removes the temporary folder."""
    real = StoreWriter.write_layer

    for exc in (OSError("disk full"), KeyboardInterrupt()):

        def failing(self, i, *a, **kw):
            if i == self.config.n_layers - 1:
                raise exc
            return real(self, i, *a, **kw)

        monkeypatch.setattr(StoreWriter, "write_layer", failing)
        out = tmp_path / f"out-{type(exc).__name__}"
        out.mkdir()
        with pytest.raises(type(exc)):
            quiet_convert(hf_llama.path, out / "model.llmflash")
        assert_nothing_left(out)


def test_existing_destination(tmp_path, hf_opt):
    dst = quiet_convert(hf_opt.path, tmp_path / "out", dtype="float32")
    with pytest.raises(ConvertError, match="already exists") as e:
        quiet_convert(hf_opt.path, dst)
    assert str(dst) in str(e.value)
    quiet_convert(hf_opt.path, dst, dtype="bfloat16", force=True)
    assert Store(dst).dtype_name == "bfloat16"
    assert_nothing_left(tmp_path, "out")


def test_destination_inside_source(tmp_path, hf_opt):
    src = clone(hf_opt.path, tmp_path)
    with pytest.raises(ConvertError, match="inside"):
        convert_hf(src, src / "out")


def test_bad_dtype(tmp_path, hf_opt):
    with pytest.raises(ConvertError, match="int8"):
        convert_hf(hf_opt.path, tmp_path / "out", dtype="int8")


def test_float16_overflow_suggests_bfloat16(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    edit_tensors(src, lambda t: t["model.layers.0.mlp.up_proj.weight"].__setitem__((0, 0), 1e6))
    with pytest.raises(ConvertError, match="bfloat16"):
        quiet_convert(src, tmp_path / "out", dtype="float16")
    assert not (tmp_path / "out").exists()
    quiet_convert(src, tmp_path / "out", dtype="bf16")


# -- good inputs --------------------------------------------------------------------------------------
def test_sharded_checkpoint_matches_single_file(tmp_path, hf_llama, convert_to):
    sharded = build_hf("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded.path / "model.safetensors.index.json").is_file()
    assert len(list(sharded.path.glob("*.safetensors"))) >= 3
    a = logits(convert_to(sharded.path))
    b = logits(convert_to(hf_llama.path))
    assert torch.equal(a, b)  # same seed, same weights


def test_sharded_checkpoint_missing_shard(tmp_path):
    sharded = build_hf("opt", tmp_path / "sharded", max_shard_size="40KB")
    index = sharded.path / "model.safetensors.index.json"
    victim = sorted(sharded.path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(ConvertError, match=f"shard '{victim.name}'") as e:
        convert_hf(sharded.path, tmp_path / "out")
    assert str(index) in str(e.value)


def test_sharded_checkpoint_tensor_not_where_index_says(tmp_path):
    sharded = build_hf("opt", tmp_path / "sharded", max_shard_size="40KB")
    index = sharded.path / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    name, shard = next((k, v) for k, v in wm["weight_map"].items() if "fc2.weight" in k)
    tensors = load_file(str(sharded.path / shard))
    tensors.pop(name)
    save_file(tensors, str(sharded.path / shard), metadata={"format": "pt"})
    with pytest.raises(ConvertError, match="missing tensor") as e:
        convert_hf(sharded.path, tmp_path / "out")
    assert str(sharded.path / shard) in str(e.value)


def test_tokenizer_and_chat_template_copied(hf_llama, convert_to):
    store = Store(convert_to(hf_llama.path))
    assert store.tokenizer().encode("t3 t9").ids == [3, 9]
    assert store.chat_template and "messages" in store.chat_template
    assert store.config.bos_token_id == 1 and store.config.eos_token_ids == [2]


def test_tokenizer_from_elsewhere(tmp_path, hf_opt):
    tok = tmp_path / "my-tokenizer.json"
    tok.write_text(tiny_tokenizer_json())
    store = Store(convert_hf(hf_opt.path, tmp_path / "out", tokenizer=tok))
    assert store.tokenizer().encode("t4").ids == [4]


def test_missing_tokenizer_warns(tmp_path, hf_opt):
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        store = Store(convert_hf(hf_opt.path, tmp_path / "out"))
    assert store.tokenizer() is None


def test_invalid_tokenizer(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    (src / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(ConvertError, match="tokenizers JSON") as e:
        convert_hf(src, tmp_path / "out")
    assert str(src / "tokenizer.json") in str(e.value)


def test_eos_lists_and_generation_config(tmp_path, hf_llama):
    src = clone(hf_llama.path, tmp_path)
    edit_config(src, eos_token_id=[2, 5])
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 9]}))
    store = Store(quiet_convert(src, tmp_path / "out"))
    assert store.config.eos_token_ids == [2, 5, 9]


def test_mistral_without_window_is_llama(tmp_path, hf_llama, convert_to):
    src = clone(hf_llama.path, tmp_path)
    edit_config(src, model_type="mistral", sliding_window=None)
    assert torch.equal(logits(convert_to(src)), logits(convert_to(hf_llama.path)))


def test_checkpoint_without_model_prefix(tmp_path, hf_opt, convert_to):
    """facebook/opt-* checkpoints name tensors `decoder.*` (saved from OPTModel)."""
    src = clone(hf_opt.path, tmp_path)
    edit_tensors(src, lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)}))
    assert torch.equal(logits(convert_to(src)), logits(convert_to(hf_opt.path)))


def test_legacy_rope_keys():
    """transformers 4 wrote rope_theta + rope_scaling {"type"/"rope_type": ...}; 5 writes rope_parameters."""

    class Cfg(HFConfig):
        def __init__(self, d):
            self.path, self.d = Path("config.json"), d

    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    want = {"rope_type": "llama3", **llama3}
    assert _rope(Cfg({"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **llama3}})) == (5e5, want)
    assert _rope(Cfg({"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **llama3}})) == (5e5, want)
    assert _rope(Cfg({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **llama3}})) == (5e5, want)
    assert _rope(Cfg({})) == (10000.0, None)
    assert _rope(Cfg({"rope_theta": 1e6, "rope_scaling": None})) == (1e6, None)
    assert _rope(Cfg({"rope_scaling": {"type": "linear", "factor": 2}})) == (
        10000.0,
        {"rope_type": "linear", "factor": 2.0},
    )
    with pytest.raises(ConvertError, match="low_freq_factor"):
        _rope(Cfg({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}))
    with pytest.raises(ConvertError, match="inconsistent"):
        _rope(Cfg({"rope_scaling": {**want, "high_freq_factor": 0.5}}))
