"""Store format 4: every file's size and CRC-32, and the manifest's own checksum, recorded at
write time and checked where each is loaded and by `llmflash verify`. Each damage below passed
silently before (exit 0, a changed answer); now it is a StoreError naming the file, through the
API and the CLI (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_json
from safetensors.torch import load_file, save_file
from store_builders import edit_manifest, opt_config, reseal, tiny_config, write_predictors, write_store

from llmflash.api import FlashModel
from llmflash.cli import main
from llmflash.errors import LlmflashError, StoreError
from llmflash.sparsity.predictors_file import load_predictors
from llmflash.store import PREDICTORS, Store, checksums
from llmflash.store.checksums import file_crc32, file_entry, manifest_crc32
from llmflash.verify import verify_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny float32 Llama with a tokenizer (its 64 ids) and a predictors file, all recorded."""
    dst = write_store(tmp_path_factory.mktemp("sums") / "tiny.llmflash", tokenizer=tiny_tokenizer_json(64))
    path = write_predictors(dst / PREDICTORS, tiny_config())
    edit_manifest(dst, lambda m: m.update(predictors={"file": PREDICTORS, "bytes": path.stat().st_size}))
    return reseal(dst)


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "s.llmflash"
    shutil.copytree(pristine, dst)
    return dst


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor `name`'s bytes start in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return 8 + n + header[name]["data_offsets"][0]


def cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_writer_records_every_file_and_the_manifest(pristine):
    m = json.loads((pristine / "manifest.json").read_text())
    assert m["version"] == 4
    assert set(m["files"]) == {"resident.safetensors", "bundles.crc32", "tokenizer.json", "predictors.safetensors"}
    for name, entry in m["files"].items():
        data = (pristine / name).read_bytes()
        assert entry == {"bytes": len(data), "crc32": zlib.crc32(data)} == file_entry(pristine / name)
    body = {k: v for k, v in m.items() if k != "manifest_crc32"}
    assert m["manifest_crc32"] == zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    assert m["manifest_crc32"] == manifest_crc32(m)
    assert verify_store(pristine, progress=False).unchecked == ()


def test_flipped_byte_in_an_attention_matrix(store, capsys):
    rpath = store / "resident.safetensors"
    flip(rpath, tensor_offset(rpath, "layers.0.attn.q.weight") + 4 * 37 + 1)  # a low mantissa bit
    s = Store(store)  # same size: opens
    with pytest.raises(StoreError, match=r"resident\.safetensors: checksum mismatch.*changed after conversion"):
        s.resident()
    with pytest.raises(LlmflashError, match=r"resident\.safetensors: checksum mismatch"):
        FlashModel.open(store)
    assert str(rpath) in cli_error(capsys, "generate", str(store), "-p", "t1 t2", "-n", "2")
    assert str(rpath) in cli_error(capsys, "verify", "-q", str(store))


@pytest.mark.parametrize(
    "name,value",
    [("embed.weight", float("nan")), ("layers.1.ffn_norm.weight", float("inf")), ("norm.weight", float("-inf"))],
)
def test_non_finite_resident_tensor(store, capsys, name, value):
    """Written with safetensors into the store: the checksum fails; recorded anew (reseal, as a
    hostile or older writer would leave it), the finiteness check still refuses the tensor."""
    rpath = store / "resident.safetensors"
    t = load_file(str(rpath))
    t[name].view(-1)[3] = value
    save_file(t, str(rpath), metadata={"format": "llmflash-store"})
    with pytest.raises(StoreError, match=r"resident\.safetensors: checksum mismatch"):
        Store(store).resident()
    reseal(store)
    with pytest.raises(StoreError, match=rf"resident\.safetensors: {name} holds non-finite values"):
        Store(store).resident()
    assert name in cli_error(capsys, "verify", "-q", str(store))


def test_non_finite_up_bias(tmp_path):
    dst = write_store(tmp_path / "opt.llmflash", opt_config())
    t = load_file(str(dst / "resident.safetensors"))
    t["layers.1.ffn.up_bias"][7] = float("nan")
    save_file(t, str(dst / "resident.safetensors"))
    reseal(dst)
    with pytest.raises(StoreError, match=r"layers\.1\.ffn\.up_bias holds non-finite values"):
        Store(dst).up_biases()


def test_changed_predictors_file(store, capsys):
    ppath = store / PREDICTORS
    flip(ppath, tensor_offset(ppath, "layers.0.in.weight") + 2)
    Store(store)  # predictors are checked where loaded
    with pytest.raises(StoreError, match=r"predictors\.safetensors: checksum mismatch.*calibrate"):
        load_predictors(store)
    with pytest.raises(LlmflashError, match=r"predictors\.safetensors"):
        FlashModel.open(store, sparsity="predictor", memory="2x")
    assert str(ppath) in cli_error(capsys, "verify", "-q", str(store))


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace('"rope_theta": 10000.0', '"rope_theta": 10001.0'),
        lambda t: t.replace('"crc32": ', '"crc32": 1', 1),
        lambda t: t.replace('"version": 4', '"version": 3'),  # a downgrade keeps its checksum: checked
        lambda t: t.replace('"chat_template": null', '"chat_template": "{{ 1 }}"'),
    ],
    ids=["config", "region-crc", "version", "template"],
)
def test_edited_manifest(store, capsys, edit):
    mpath = store / "manifest.json"
    text = mpath.read_text()
    assert edit(text) != text
    mpath.write_text(edit(text))
    with pytest.raises(StoreError, match=r"manifest\.json: the manifest does not match its manifest_crc32"):
        Store(store)
    assert str(mpath) in cli_error(capsys, "verify", "-q", str(store))


def test_corrupt_bundle_table_is_blamed_on_itself(store, capsys):
    cpath = store / "bundles.crc32"
    flip(cpath, 4 * 30)
    s = Store(store)
    with pytest.raises(StoreError, match=r"bundles\.crc32: checksum mismatch"):
        s.read_bundles(1, torch.tensor([0, 1]).numpy())
    with pytest.raises(StoreError, match=r"bundles\.crc32: checksum mismatch"):
        FlashModel.open(store, memory="2x", sparsity="all").logits([1, 2, 3])
    assert str(cpath) in cli_error(capsys, "verify", "-q", str(store))


def test_declared_predictors_missing(store, capsys):
    (store / PREDICTORS).unlink()
    Store(store)
    with pytest.raises(StoreError, match=r"predictors\.safetensors: missing: the manifest declares predictors"):
        verify_store(store, progress=False)
    assert str(store / PREDICTORS) in cli_error(capsys, "verify", "-q", str(store))


def test_tokenizer_beyond_the_vocabulary(tmp_path, capsys):
    dst = write_store(tmp_path / "s.llmflash", tokenizer=tiny_tokenizer_json(128))  # the model has 64 rows
    with pytest.raises(StoreError, match=r"tokenizer\.json: the tokenizer has 128 tokens .* vocabulary is 64"):
        verify_store(dst, progress=False)
    assert str(dst / "tokenizer.json") in cli_error(capsys, "verify", "-q", str(dst))


def test_changed_or_added_tokenizer(store, tmp_path):
    tpath = store / "tokenizer.json"
    tpath.write_text(tpath.read_text().replace('"t10"', '"t1x"'))  # same size
    with pytest.raises(StoreError, match=r"tokenizer\.json: checksum mismatch"):
        Store(store).tokenizer()
    bare = write_store(tmp_path / "bare.llmflash")
    (bare / "tokenizer.json").write_text(tiny_tokenizer_json(64))
    with pytest.raises(StoreError, match=r"tokenizer\.json: not recorded in the manifest's files"):
        Store(bare)


@pytest.mark.parametrize("name", ["resident.safetensors", "tokenizer.json"])
def test_truncated_file_is_caught_at_open(store, name):
    p = store / name
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(StoreError, match=rf"{name}: file is \d+ bytes.*(truncated|records)"):
        Store(store)


def test_version_3_store_opens_unchecked(store, capsys):
    def as_v3(m):
        m.update(version=3)
        m.pop("files")

    edit_manifest(store, as_v3)
    assert "manifest_crc32" not in json.loads((store / "manifest.json").read_text())
    rpath = store / "resident.safetensors"
    flip(rpath, tensor_offset(rpath, "layers.0.attn.q.weight") + 1)  # unseen: nothing recorded
    s = Store(store)
    assert s.files is None and not s.check_file("resident.safetensors")
    r = verify_store(store, progress=False)
    assert r.version == 3 and "manifest.json checksum" in r.unchecked and "resident.safetensors checksum" in r.unchecked
    assert "format version 3 records no manifest.json checksum" in r.summary()


def test_resident_hashed_once_per_store(tmp_path, monkeypatch):
    dst = write_store(tmp_path / "opt.llmflash", opt_config())
    calls = []
    real = checksums.file_crc32
    monkeypatch.setattr(checksums, "file_crc32", lambda p: calls.append(Path(p).name) or real(p))
    s = Store(dst)
    s.resident()
    s.up_biases()
    s.resident()
    assert calls == ["resident.safetensors"]


def test_hashing_streams_the_file(tmp_path):
    """file_crc32 holds one chunk, not the file: memory stays flat whatever the size."""
    p = tmp_path / "big.bin"
    data = torch.randint(0, 256, (48 << 20,), dtype=torch.uint8).numpy().tobytes()
    p.write_bytes(data)
    tracemalloc.start()
    try:
        got = file_crc32(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert got == (len(data), zlib.crc32(data))
    assert peak < checksums.HASH_CHUNK + (1 << 20), peak


def test_calibrate_records_predictors_and_recovers_from_an_interruption(tmp_path, capsys, monkeypatch):
    """calibrate writes predictors.safetensors, then the manifest recording its checksum. Killed
    between the two, the store still opens, loading the predictors is a StoreError naming them,
    and calibrate runs again."""
    import random

    from llmflash.sparsity import calibration as C

    store = write_store(tmp_path / "s.llmflash", tokenizer=tiny_tokenizer_json(64))
    text = tmp_path / "calib.txt"
    rng = random.Random(0)
    text.write_text(" ".join(f"t{rng.randrange(2, 64)}" for _ in range(400)))
    args = [
        "calibrate",
        str(store),
        "--text",
        str(text),
        "--tokens",
        "300",
        "--rank",
        "4",
        "--epochs",
        "1",
        "--chunk",
        "100",
        "--batch",
        "64",
        "--quiet",
    ]

    def killed(*a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(C, "write_manifest", killed)
    assert main(args) == 2
    capsys.readouterr()
    Store(store)
    with pytest.raises(StoreError, match=r"predictors\.safetensors: not recorded.*calibrate` again"):
        load_predictors(store)
    monkeypatch.undo()
    assert main(args) == 0
    m = json.loads((store / "manifest.json").read_text())
    assert m["files"][PREDICTORS] == file_entry(store / PREDICTORS) and m["manifest_crc32"] == manifest_crc32(m)
    assert load_predictors(store).meta["rank"] == 4
    assert verify_store(store, progress=False).predictors
