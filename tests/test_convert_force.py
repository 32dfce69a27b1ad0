"""`llmflash convert SRC DST --force` replaces DST only when it is an llmflash store or an empty
folder, never a folder holding anything else, a file, a symbolic link, the source or a folder
containing it; an old store is deleted only once the new one is in place (convert/writer.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import build_hf
from llmflash.cli import main
from llmflash.convert.gguf import convert_gguf
from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError
from llmflash.store import Store
from test_convert_gguf import write_tiny_gguf


def quiet_convert(src: Path, dst: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_hf(src, dst, **kw)


def cli(capsys, *args: str) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["convert", *map(str, args)])
    return rc, capsys.readouterr().err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_temp_left(parent: Path) -> None:
    assert not [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    return build_hf("llama", tmp_path_factory.mktemp("force") / "hf").path


def test_force_refuses_non_store_folder_cli(capsys, tmp_path, hf_src):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "n.txt").write_text("x\n")
    rc, err = cli(capsys, hf_src, victim, "--force")
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(victim) in lines[0] and "not an llmflash store" in lines[0]
    assert (victim / "sub" / "n.txt").read_text() == "x\n"
    no_temp_left(tmp_path)


def test_force_refuses_non_store_folder_subprocess(tmp_path, hf_src):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "-m", "llmflash", "convert", str(hf_src), str(victim), "--force"],
                       capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")})
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(victim) in r.stderr.strip().splitlines()[-1]
    assert (victim / "notes.txt").read_text() == "keep me"


def test_force_refuses_ancestor_of_source(capsys, tmp_path):
    top = tmp_path / "x"
    src = build_hf("llama", top / "hf").path
    before = snapshot(top)
    rc, err = cli(capsys, src, top, "--force")
    assert rc == 2 and str(top) in err and "contains the source" in err
    assert snapshot(top) == before
    # also through a symbolic link to the ancestor, and with the source itself as destination
    link = tmp_path / "link"
    link.symlink_to(top, target_is_directory=True)
    with pytest.raises(ConvertError, match="contains the source"):
        quiet_convert(src, link, force=True)
    with pytest.raises(ConvertError, match="the source"):
        quiet_convert(src, src, force=True)
    with pytest.raises(ConvertError, match="inside"):
        quiet_convert(src, src / "out", force=True)
    assert snapshot(top) == before
    no_temp_left(tmp_path)


def test_force_refuses_gguf_folder(tmp_path):
    gg = tmp_path / "models" / "tiny.gguf"
    gg.parent.mkdir()
    write_tiny_gguf(gg)
    before = snapshot(gg.parent)
    with pytest.raises(ConvertError, match="contains the source"):
        convert_gguf(gg, gg.parent, force=True)
    with pytest.raises(ConvertError, match="source itself"):
        convert_gguf(gg, gg, force=True)
    assert snapshot(gg.parent) == before


def test_force_replaces_existing_store(tmp_path, hf_src):
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert Store(dst).dtype_name == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


def test_force_over_empty_folder(capsys, tmp_path, hf_src):
    dst = tmp_path / "empty"
    dst.mkdir()
    rc, _ = cli(capsys, hf_src, dst, "--force", "--dtype", "float32")
    assert rc == 0
    assert Store(dst).dtype_name == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_force_refuses_file_symlink_and_store_with_extras(tmp_path, hf_src):
    f = tmp_path / "file"
    f.write_text("data")
    with pytest.raises(ConvertError, match="is a file") as e:
        quiet_convert(hf_src, f, force=True)
    assert str(f) in str(e.value) and f.read_text() == "data"

    store = quiet_convert(hf_src, tmp_path / "s.llmflash", dtype="float32")
    link = tmp_path / "link"
    link.symlink_to(store, target_is_directory=True)
    with pytest.raises(ConvertError, match="symbolic link"):
        quiet_convert(hf_src, link, force=True)
    assert link.is_symlink() and Store(store).dtype_name == "float32"

    (store / "README.txt").write_text("mine")
    with pytest.raises(ConvertError, match="README.txt"):
        quiet_convert(hf_src, store, dtype="bfloat16", force=True)
    assert (store / "README.txt").read_text() == "mine"

    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(ConvertError, match="manifest"):
        quiet_convert(hf_src, fake, force=True)
    assert (fake / "manifest.json").exists()
    no_temp_left(tmp_path)


def test_old_store_survives_failed_swap(tmp_path, hf_src, monkeypatch):
    """If renaming the new store in fails, the old one is put back where it was."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    real = os.rename

    def rename(a, b):
        if ".tmp-" in os.fspath(a):
            raise OSError("simulated failure")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert Store(dst).dtype_name == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


def test_force_refuses_folder_with_hostile_manifest(capsys, tmp_path, hf_src):
    """A manifest.json nested too deeply to parse is not a store's: refused, not a traceback."""
    victim = tmp_path / "deep"
    victim.mkdir()
    (victim / "manifest.json").write_text("[" * 200_000)
    rc, err = cli(capsys, hf_src, victim, "--force")
    assert rc == 2 and "Traceback" not in err
    assert str(victim) in err and "not an llmflash store manifest" in err
    assert (victim / "manifest.json").read_text() == "[" * 200_000
