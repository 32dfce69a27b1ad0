"""Hostile manifests that used to escape as tracebacks or pass: a list where a string belongs
(TypeError), 1e400 where an integer belongs (OverflowError), duplicate keys (the last one won),
a chat template no encoder can write (a lone surrogate), malformed checksum records; and a
resident.safetensors that cannot be opened for lack of permission, which safetensors reported as
"No such file or directory". Each is a StoreError naming the file (and the field), exit 2 and one
line from the CLI."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from store_builders import edit_manifest

from llmflash.cli import main
from llmflash.errors import StoreError
from llmflash.store import Store, checksums, write_manifest
from llmflash.store import store as store_module


def refused(store: Path, *words: str) -> str:
    """The StoreError opening `store` (naming manifest.json and each of `words`); the CLI's one line."""
    with pytest.raises(StoreError) as e:
        Store(store)
    msg = str(e.value)
    assert str(store / "manifest.json") in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def test_cli_one_line(store, capsys):
    edit_manifest(store, lambda m: m.update(dtype=["float16"]))
    assert main(["verify", "-q", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(store / "manifest.json") in err[0] and "dtype" in err[0], err


@pytest.mark.parametrize("value", [["float16"], {"float16": 1}])
def test_dtype_of_the_wrong_type(store, value):
    edit_manifest(store, lambda m: m.update(dtype=value))
    refused(store, "dtype")


@pytest.mark.parametrize("at,value", [(1, float("inf")), (1, 1.5), (1, 32.0), (1, "32"), (1, True), (0, 1)])
def test_fields_of_the_wrong_type(store, at, value):
    """Once converted with int() / str() (so 32.0 and "32" passed, and inf overflowed)."""
    edit_manifest(store, lambda m: m["layers"][0]["fields"][0].__setitem__(at, value))
    refused(store, "layers[0].fields")


def test_fields_1e400_as_written(store, capsys):
    """The literal 1e400 (a float the parser makes inf), with a manifest checksum that matches."""
    edit_manifest(store, lambda m: m["layers"][0]["fields"][0].__setitem__(1, float("inf")))
    mpath = store / "manifest.json"
    mpath.write_text(mpath.read_text().replace("Infinity", "1e400"))
    refused(store, "layers[0].fields", "inf")
    assert main(["verify", "-q", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "layers[0].fields" in err[0] and str(mpath) in err[0], err


def test_duplicate_keys(store):
    mpath = store / "manifest.json"
    mpath.write_text(mpath.read_text().replace('{\n "format"', '{\n "dtype": "float16",\n "format"', 1))
    refused(store, "duplicate key 'dtype'")
    mpath.write_text(
        mpath.read_text()
        .replace('"dtype": "float16",', "", 1)
        .replace('"offset": 0,', '"offset": 0, "offset": 4096,', 1)
    )
    refused(store, "duplicate key 'offset'")


def test_chat_template_with_a_lone_surrogate(store, capsys):
    edit_manifest(store, lambda m: m.update(chat_template="{{ 'hi' }}\udcff"))
    assert "\\udcff" in (store / "manifest.json").read_text()  # valid JSON, not encodable text
    refused(store, "chat_template", "not valid UTF-8")
    assert main(["verify", "-q", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "chat_template" in err[0], err


def test_manifest_of_invalid_utf8(store):
    mpath = store / "manifest.json"
    mpath.write_bytes(mpath.read_bytes().replace(b'"chat_template": null', b'"chat_template": "\xff\xfe"'))
    refused(store, "not valid UTF-8")


def test_chat_template_not_a_string(store):
    edit_manifest(store, lambda m: m.update(chat_template=["{{ 1 }}"]))
    refused(store, "chat_template is a list")


@pytest.mark.parametrize(
    "mutate,words",
    [
        (lambda m: m.update(files=[]), ("files",)),
        (lambda m: m.pop("files"), ("files",)),
        (lambda m: m["files"].pop("resident.safetensors"), ("files['resident.safetensors'] is missing",)),
        (lambda m: m["files"].update({"ffn.bin": {"bytes": 1, "crc32": 1}}), ("files['ffn.bin']",)),
        (
            lambda m: m["files"]["resident.safetensors"].update(bytes=float("inf")),
            ("files['resident.safetensors'].bytes",),
        ),
        (lambda m: m["files"]["bundles.crc32"].update(crc32=-1), ("files['bundles.crc32'].crc32",)),
        (lambda m: m["files"].update({"bundles.crc32": [352, 0]}), ("files['bundles.crc32']",)),
    ],
    ids=["list", "absent", "no-resident", "ffn", "inf-bytes", "negative-crc", "entry-list"],
)
def test_malformed_checksum_records(store, mutate, words):
    edit_manifest(store, mutate)
    refused(store, *words)


@pytest.mark.parametrize("value", [None, "0", 1.0, 2**32, float("inf")])
def test_manifest_crc32_of_the_wrong_type(store, value):
    m = json.loads((store / "manifest.json").read_text())
    m["manifest_crc32"] = value
    (store / "manifest.json").write_text(json.dumps(m))
    refused(store, "manifest_crc32")


def _deny(monkeypatch, module, name: str) -> None:
    """`open` in `module` fails on file `name` as it would under chmod 000 for a normal user."""
    real = open

    def fake(path, *a, **k):
        if Path(path).name == name:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(module, "open", fake, raising=False)


@pytest.mark.parametrize("version", [4, 3])
def test_permission_denied_says_so(store, monkeypatch, capsys, version):
    """Version 4 hashes the file first (llmflash.store.checksums opens it); version 3 opens it before
    safetensors does: either way the message is the system's reason, not "no such file"."""
    if version == 3:
        edit_manifest(store, lambda m: m.update(version=3))
    _deny(monkeypatch, checksums if version == 4 else store_module, "resident.safetensors")
    with pytest.raises(StoreError) as e:
        Store(store).resident()
    msg = str(e.value)
    assert str(store / "resident.safetensors") in msg and "Permission denied" in msg, msg
    assert "No such file" not in msg
    assert main(["verify", "-q", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "resident.safetensors" in err[0] and "Permission denied" in err[0], err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod-000 file (the mapping is tested above)")
def test_permission_denied_for_real(store):
    rpath = store / "resident.safetensors"
    rpath.chmod(0)
    try:
        with pytest.raises(StoreError, match="resident.safetensors: cannot read: Permission denied"):
            Store(store).resident()
    finally:
        rpath.chmod(0o644)


def test_write_manifest_seals_only_version_4(store):
    m = json.loads((store / "manifest.json").read_text())
    write_manifest(store, {**m, "version": 3, "manifest_crc32": 5})
    assert "manifest_crc32" not in json.loads((store / "manifest.json").read_text())
    Store(store)
    write_manifest(store, m)
    assert json.loads((store / "manifest.json").read_text())["manifest_crc32"] == checksums.manifest_crc32(m)
    Store(store)
