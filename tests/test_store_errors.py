"""Bad stores: every problem is a StoreError naming the file, through the API and the CLI
(one line on stderr, exit code 2, no traceback)."""

from __future__ import annotations

import os

import pytest
import torch
from store_builders import edit_manifest, opt_config, reseal, run_cli, write_store

from llmflash.errors import ConvertError, StoreError
from llmflash.store import Store, expected_resident


def test_pristine_store_opens_and_reads(store):
    s = Store(store)
    assert [L.offset % 4096 for L in s.layers] == [0, 0]
    for i in range(2):
        assert s.read_layer(i).shape == (s.config.ffn_dims[i], 3 * s.config.dim)
    assert set(s.resident()) == set(expected_resident(s.config))


@pytest.mark.parametrize("name", ["manifest.json", "resident.safetensors", "ffn.bin"])
def test_missing_file(store, name):
    (store / name).unlink()
    with pytest.raises(StoreError, match=name):
        Store(store)


def test_extra_file(store):
    (store / "notes.bin").write_bytes(b"x")
    with pytest.raises(StoreError, match="notes.bin"):
        Store(store)


def test_extra_tensor(store):
    from safetensors.torch import load_file, save_file

    t = load_file(str(store / "resident.safetensors"))
    t["layers.0.attn.extra.weight"] = torch.zeros(3)
    save_file(t, str(store / "resident.safetensors"))
    reseal(store)  # meet the check behind the checksum
    with pytest.raises(StoreError, match="resident.safetensors.*unexpected"):
        Store(store).resident()


def test_missing_tensor(store):
    from safetensors.torch import load_file, save_file

    t = load_file(str(store / "resident.safetensors"))
    del t["layers.1.attn.q.weight"]
    save_file(t, str(store / "resident.safetensors"))
    reseal(store)  # meet the check behind the checksum
    with pytest.raises(StoreError, match="resident.safetensors.*layers.1.attn.q.weight"):
        Store(store).resident()


def test_truncated_resident(store):
    p = store / "resident.safetensors"
    p.write_bytes(p.read_bytes()[:1000])
    with pytest.raises(StoreError, match="resident.safetensors"):
        Store(store).resident()


def test_truncated_ffn(store):
    p = store / "ffn.bin"
    os.truncate(p, p.stat().st_size - 4096)
    with pytest.raises(StoreError, match="ffn.bin.*truncated"):
        Store(store)


def test_checksum_mismatch(store):
    s = Store(store)
    off = s.layers[1].offset + 100
    with open(store / "ffn.bin", "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    s.read_layer(0)  # layer 0 is intact
    with pytest.raises(StoreError, match="ffn.bin.*checksum mismatch in layer 1"):
        s.read_layer(1)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda m: m.update(version=99), "unknown format version 99"),
        (lambda m: m.update(version=True), "unknown format version True"),
        (lambda m: m.update(version="2"), "unknown format version '2'"),
        (lambda m: m.update(format="other"), "format"),
        (lambda m: m.update(dtype="int3"), "dtype"),
        (lambda m: m["config"].update(arch="gpt_neox"), "unsupported architecture 'gpt_neox'"),
        (lambda m: m["config"].update(n_layers=3), "n_heads must list 3 layers"),
        (lambda m: m["config"].update(bogus=1), "unknown config keys"),
        (lambda m: m["config"].update(rope_scaling={"rope_type": "yarn"}), "rope_scaling type 'yarn'"),
        (lambda m: m["layers"][1].update(offset=1 << 40), "outside ffn.bin"),
        (lambda m: m["layers"][1].update(offset=2**70), "layers\\[1\\].offset"),
        (lambda m: m["layers"][1].update(offset=-4096), "layers\\[1\\].offset"),
        (lambda m: m["layers"][1].update(offset=4095), "aligned"),
        (lambda m: m["layers"][1].update(offset=0), "overlaps"),
        (lambda m: m["layers"][0].update(n_neurons=10**9), "n_neurons"),
        (lambda m: m["layers"][0].update(bundle_bytes=7), "bundle layout"),
        (lambda m: m["layers"][0].update(region_bytes=1 << 60), "region_bytes"),
        (lambda m: m["layers"][0].update(order=[0] * 48), "permutation"),
        (lambda m: m.update(layers=m["layers"][:1]), "layers must list 2"),
        (lambda m: m.update(ffn_bytes="many"), "ffn_bytes"),
    ],
)
def test_hostile_manifest(store, mutate, match):
    edit_manifest(store, mutate)
    with pytest.raises(StoreError, match=match) as e:
        Store(store)
    assert "manifest.json" in str(e.value) or "ffn.bin" in str(e.value)


def test_version_1_store_without_ffn_bias_opens(store):
    """Version 1 differs from 2 only in OPT's bundles (the fc1 bias moved out of them), so a
    version-1 store of a bias-free model (the users' converted SmolLM2) opens as it is."""
    edit_manifest(store, lambda m: m.update(version=1))
    (store / "bundles.crc32").unlink()  # version 3 added it
    s = Store(store)
    assert s.manifest["version"] == 1 and not s.config.ffn_bias
    assert s.read_layer(1).shape == (s.config.ffn_dims[1], 3 * s.config.dim)
    assert set(s.resident()) == set(expected_resident(s.config))
    assert s.up_biases() == [None, None]


def test_version_1_store_with_ffn_bias_is_rejected(tmp_path):
    """A version-1 OPT store kept the fc1 bias as the bundle's last value: convert it again."""
    dst = write_store(tmp_path / "opt.llmflash", opt_config())
    s = Store(dst)
    assert s.layers[0].bundle_bytes == 2 * s.config.dim * 4  # up + down only
    assert [tuple(b.shape) for b in s.up_biases()] == [(48,), (40,)]

    def as_v1(m):  # what version 1 wrote
        m["version"] = 1
        for L in m["layers"]:
            L["fields"].append(["bias", 1])
            L["bundle_bytes"] += 4

    edit_manifest(dst, as_v1)
    (dst / "bundles.crc32").unlink()
    with pytest.raises(StoreError, match="bundle layout changed.*re-run `llmflash convert`") as e:
        Store(dst)
    assert str(dst / "manifest.json") in str(e.value)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda t: t.pop("layers.1.ffn.up_bias"), "missing tensor layers.1.ffn.up_bias"),
        (lambda t: t.update({"layers.0.ffn.up_bias": torch.zeros(47)}), r"layers.0.ffn.up_bias has shape \(47,\)"),
    ],
)
def test_bad_up_bias(tmp_path, mutate, match):
    from safetensors.torch import load_file, save_file

    dst = write_store(tmp_path / "opt.llmflash", opt_config())
    t = load_file(str(dst / "resident.safetensors"))
    mutate(t)
    save_file(t, str(dst / "resident.safetensors"))
    reseal(dst)  # meet the check behind the checksum
    with pytest.raises(StoreError, match="resident.safetensors.*" + match):
        Store(dst).up_biases()


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_manifest_not_json_object(store, content):
    (store / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match="manifest.json"):
        Store(store)


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="no such store"):
        Store(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Store(tmp_path / "file")


def test_convert_rejects_non_model(tmp_path):
    from llmflash.convert import convert

    src = tmp_path / "weights.txt"
    src.write_text("hello")
    with pytest.raises(ConvertError, match="weights.txt.*neither"):
        convert(src, tmp_path / "out")
    with pytest.raises(ConvertError, match="missing-model"):
        convert(tmp_path / "missing-model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_bad_store_exit_2(store):
    os.truncate(store / "ffn.bin", 4096)
    r = run_cli("generate", str(store), "-p", "hi")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "ffn.bin" in lines[0] and "truncated" in lines[0]


def test_cli_bad_source_exit_2(tmp_path):
    src = tmp_path / "x.txt"
    src.write_text("x")
    r = run_cli("convert", str(src), str(tmp_path / "o"))
    assert r.returncode == 2 and "x.txt" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("convert")  # argparse usage error
    assert r.returncode == 2
