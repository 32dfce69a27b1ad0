"""A corrupt ffn.bin is an error, not wrong logits: the strategies that read a layer's region
whole (dense at open, naive on every read) check the region's CRC-32, flash each bundle's, and
`llmflash verify` checks a whole store."""

from __future__ import annotations

import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import flip_bit, tiny_tokenizer_json
from store_builders import edit_manifest, run_cli, tiny_config, write_store

from llmflash.cli import main
from llmflash.errors import StoreError
from llmflash.store import Store
from llmflash.strategies.naive import NaiveFFN
from llmflash.verify import verify_store


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """store_builders.write_store's tiny float32 Llama, with a tokenizer (its 64 ids) for the CLI."""
    return write_store(tmp_path_factory.mktemp("crc") / "tiny.llmflash", tokenizer=tiny_tokenizer_json(64))


@pytest.fixture
def corrupt(pristine, tmp_path) -> Path:
    """A copy of the store with one bit of layer 1's region flipped: bit 24 (an exponent bit) of
    neuron 0's gate[25] (float32, little-endian), which scales that weight by 4 or 1/4."""
    dst = tmp_path / "c.llmflash"
    shutil.copytree(pristine, dst)
    off = Store(dst).layers[1].offset + 25 * 4 + 3
    flip_bit(dst / "ffn.bin", off)
    return dst


def x() -> torch.Tensor:
    return torch.randn(1, tiny_config().dim, generator=torch.Generator().manual_seed(1))


def test_naive_checks_each_region(corrupt):
    ffn = NaiveFFN(Store(corrupt))
    ffn(0, x())  # layer 0 is intact
    with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in layer 1"):
        ffn(1, x())


def test_naive_checks_every_read(pristine, tmp_path):
    """A region changed under a running model (after its first, clean read) is caught too."""
    dst = tmp_path / "s.llmflash"
    shutil.copytree(pristine, dst)
    ffn = NaiveFFN(Store(dst))
    a = ffn(1, x())
    assert torch.equal(ffn(1, x()), a)  # same result read after read
    off = Store(dst).layers[1].offset + 25 * 4 + 3
    flip_bit(dst / "ffn.bin", off)
    with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in layer 1"):
        ffn(1, x())


def test_naive_without_verify_reads_what_is_there(corrupt, pristine):
    bad = NaiveFFN(Store(corrupt), verify_reads=False)(1, x())  # the check is off: no error ...
    good = NaiveFFN(Store(pristine))(1, x())
    assert not torch.equal(bad, good)  # ... and a silently different result


def test_cli_naive_on_corrupt_store_exits_2(corrupt):
    r = run_cli("generate", str(corrupt), "-p", "t1 t2", "-n", "2", "--strategy", "naive")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "ffn.bin" in r.stderr and "checksum mismatch in layer 1" in r.stderr


def test_verify_store_passes_a_pristine_store(pristine):
    r = verify_store(pristine, progress=False)
    s = Store(pristine)
    assert r.layers == len(s.layers) and r.ffn_bytes == sum(L.payload_bytes for L in s.layers)
    assert r.tokenizer and not r.predictors and r.resident_tensors > 0


def test_verify_store_finds_the_corrupt_layer(corrupt):
    with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in layer 1"):
        verify_store(corrupt, progress=False)


def test_cli_verify(pristine, corrupt, capsys):
    assert main(["verify", "-q", str(pristine)]) == 0
    assert "ok" in capsys.readouterr().err
    assert main(["verify", "-q", str(corrupt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ffn.bin" in err[0] and "checksum mismatch in layer 1" in err[0]


# -- per-bundle CRC-32s (bundles.crc32, store version 3) -------------------------------------------


def test_writer_records_every_bundles_crc(pristine):
    s = Store(pristine)
    assert s.manifest["version"] == 4 and s.has_bundle_crcs
    raw = (pristine / "ffn.bin").read_bytes()
    for i, L in enumerate(s.layers):
        want = [
            zlib.crc32(raw[L.offset + j * L.bundle_bytes : L.offset + (j + 1) * L.bundle_bytes])
            for j in range(L.n_neurons)
        ]
        assert s.bundle_crcs(i).tolist() == want
    assert verify_store(pristine, progress=False).bundles == sum(L.n_neurons for L in s.layers)


def test_read_bundles_checks_each_bundle(corrupt):
    s = Store(corrupt)
    s.read_bundles(1, np.array([1, 2, 39]))  # bundle 0 is the corrupt one
    with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in layer 1's bundle 0"):
        s.read_bundles(1, np.array([0, 5]))


@pytest.mark.parametrize("version,match", [(4, "checksum mismatch"), (3, "layer 0's bundle 7.*table is corrupt")])
def test_verify_finds_a_corrupt_table(pristine, tmp_path, version, match):
    """Blamed on bundles.crc32, not ffn.bin: by the table's own checksum (version 4), or, in a
    version-3 store, by its disagreement with the bundles of a region whose CRC-32 matches."""
    dst = tmp_path / "t.llmflash"
    shutil.copytree(pristine, dst)
    if version == 3:
        edit_manifest(dst, lambda m: m.update(version=3))
    with open(dst / "bundles.crc32", "r+b") as f:
        f.seek(4 * 7)
        b = f.read(1)
        f.seek(4 * 7)
        f.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(StoreError, match=r"bundles\.crc32: .*" + match):
        verify_store(dst, progress=False)


@pytest.mark.parametrize(
    "damage,match",
    [
        (lambda p: p.unlink(), "missing"),
        (lambda p: p.write_bytes(p.read_bytes()[:-4]), "truncated or replaced"),
    ],
)
def test_version_3_needs_its_table(pristine, tmp_path, damage, match):
    dst = tmp_path / "t.llmflash"
    shutil.copytree(pristine, dst)
    damage(dst / "bundles.crc32")
    with pytest.raises(StoreError, match=r"bundles\.crc32.*" + match):
        Store(dst)


def test_version_2_store_opens_without_a_table(pristine, tmp_path):
    dst = tmp_path / "v2.llmflash"
    shutil.copytree(pristine, dst)
    (dst / "bundles.crc32").unlink()
    edit_manifest(dst, lambda m: m.update(version=2))
    s = Store(dst)
    assert not s.has_bundle_crcs and s.bundle_crcs(0) is None
    assert s.read_bundles(1, np.array([0, 3])).shape == (2, 3 * tiny_config().dim)
    assert verify_store(dst, progress=False).bundles == 0


def test_flash_checks_each_bundle_it_reads(corrupt, pristine):
    """Every neuron wanted: the fill that reads layer 1's corrupt bundle 0 fails with a StoreError
    naming ffn.bin; the pristine store runs."""
    from llmflash.api import FlashModel

    ok = FlashModel.open(pristine, strategy="flash", memory="2x", sparsity="all")
    assert ok.ffn.layers[1].cache.has_bundle_crcs
    ok.logits([1, 2, 3])
    bad = FlashModel.open(corrupt, strategy="flash", memory="2x", sparsity="all")
    with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in bundle 0"):
        bad.logits([1, 2, 3])


def test_cli_flash_on_corrupt_bundle_exits_2(corrupt):
    r = run_cli("generate", str(corrupt), "-p", "t1 t2", "-n", "2", "--memory", "2x", "--sparsity", "all")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "ffn.bin" in r.stderr and "checksum mismatch in bundle 0" in r.stderr
