"""`llmflash convert SRC DST --force` replaces DST only when it is an llmflash store (every entry,
hidden ones included, a store file; a manifest that parses as a store's) or an empty folder, never
a folder holding anything else, a file, a symbolic link, the source or a folder containing it; an
old store is swapped out atomically (renameat2 RENAME_EXCHANGE, else two renames) and deleted
only once the new one is in place (convert/destination.py)."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import build_hf
from gguf_builders import write_tiny_gguf

from llmflash.cli import main
from llmflash.convert.gguf import convert_gguf
from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError
from llmflash.store import Store, leftovers


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
    r = subprocess.run(
        [sys.executable, "-m", "llmflash", "convert", str(hf_src), str(victim), "--force"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")},
    )
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
    """Where the kernel cannot exchange (two renames instead), if renaming the new store in
    fails, the old one is put back where it was."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    real = os.rename
    monkeypatch.setattr(leftovers, "renameat2", lambda a, b, flags: errno.ENOSYS)

    def rename(a, b):
        if ".tmp-" in os.fspath(a):
            raise OSError("simulated failure")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert Store(dst).dtype_name == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EINVAL])
def test_force_without_exchange_uses_two_renames(tmp_path, hf_src, monkeypatch, err):
    """A kernel without renameat2 (ENOSYS) or a file system without RENAME_EXCHANGE (EINVAL):
    the old store is replaced with two renames, and nothing is left beside it."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    calls = []
    monkeypatch.setattr(leftovers, "renameat2", lambda a, b, flags: calls.append(flags) or err)
    real = os.rename
    renames = []
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((Path(a).name, Path(b).name)) or real(a, b))
    quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert leftovers.RENAME_EXCHANGE in calls
    assert [b for _, b in renames] == [f".m.llmflash.old-{os.getpid()}", "m.llmflash"]
    assert Store(dst).dtype_name == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


def test_force_swaps_with_one_atomic_exchange(tmp_path, hf_src, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) works, the old store is replaced without any plain rename
    (so without an instant where the destination is missing)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    if not leftovers.exchange(a, b):
        pytest.skip("this kernel or file system has no renameat2(RENAME_EXCHANGE)")
    a.rmdir()
    b.rmdir()
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")

    def no_rename(a, b):
        raise AssertionError(f"plain rename {a} -> {b} during the swap")

    monkeypatch.setattr(os, "rename", no_rename)
    quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert Store(dst).dtype_name == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


def test_failed_exchange_keeps_old_store(tmp_path, hf_src, monkeypatch):
    """An exchange failing for another reason (EIO) is an error; the old store stays, the new
    one is removed."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    monkeypatch.setattr(leftovers, "renameat2", lambda a, b, flags: errno.EIO)
    with pytest.raises(OSError) as e:
        quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
    assert e.value.errno == errno.EIO
    assert Store(dst).dtype_name == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.llmflash"]


def test_renameat2_through_syscall(tmp_path):
    """Without a libc renameat2() wrapper (glibc < 2.28) the exchange goes through syscall()."""
    if not sys.platform.startswith("linux") or platform.machine().lower() not in leftovers._SYS_RENAMEAT2:
        pytest.skip("syscall numbers known only for Linux on common machines")
    libc = ctypes.CDLL(None, use_errno=True)

    class NoWrapper:
        syscall = libc.syscall

    call = leftovers._make_call(NoWrapper(), platform.machine())
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if call(os.fsencode(a), os.fsencode(b), leftovers.RENAME_EXCHANGE) != 0:
        pytest.skip(f"renameat2(RENAME_EXCHANGE) unsupported here (errno {ctypes.get_errno()})")
    assert not (a / "x").exists() and (b / "x").read_text() == "a"
    assert call(os.fsencode(b), os.fsencode(a), leftovers.RENAME_NOREPLACE) != 0  # a exists
    assert ctypes.get_errno() == errno.EEXIST


def test_force_refuses_folder_with_hostile_manifest(capsys, tmp_path, hf_src):
    """A manifest.json nested too deeply to parse is not a store's: refused, not a traceback."""
    victim = tmp_path / "deep"
    victim.mkdir()
    (victim / "manifest.json").write_text("[" * 200_000)
    rc, err = cli(capsys, hf_src, victim, "--force")
    assert rc == 2 and "Traceback" not in err
    assert str(victim) in err and "not an llmflash store manifest" in err
    assert (victim / "manifest.json").read_text() == "[" * 200_000


def test_force_refuses_store_with_hidden_notes(capsys, tmp_path, hf_src):
    """A user's hidden file inside a store: refused on the CLI (one line naming the destination
    and the file), nothing deleted."""
    store = quiet_convert(hf_src, tmp_path / "s.llmflash", dtype="float32")
    (store / ".my_notes.txt").write_text("mine")
    before = snapshot(store)
    rc, err = cli(capsys, hf_src, store, "--force", "--dtype", "bfloat16")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"llmflash: error: {store}:") and "'.my_notes.txt'" in lines[0]
    assert snapshot(store) == before and Store(store).dtype_name == "float32"
    no_temp_left(tmp_path)


def test_force_refuses_format_only_manifest_with_dotfiles(capsys, tmp_path, hf_src):
    """A folder holding only {"format": "llmflash-store"} and dotfiles is not a store: refused."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "manifest.json").write_text('{"format": "llmflash-store"}')
    (home / ".bashrc").write_text("alias x=y\n")
    (home / ".profile").write_text("PATH=/bin\n")
    before = snapshot(home)
    rc, err = cli(capsys, hf_src, home, "--force")
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and str(home) in lines[0] and "'.bashrc'" in lines[0]
    assert snapshot(home) == before
    (home / ".bashrc").unlink()
    (home / ".profile").unlink()
    with pytest.raises(ConvertError, match="known format version") as e:  # the manifest alone: refused too
        quiet_convert(hf_src, home, force=True)
    assert str(home) in str(e.value) and snapshot(home) == {"manifest.json": b'{"format": "llmflash-store"}'}
    no_temp_left(tmp_path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("config"), "config object"),
        (lambda m: m.update(layers={}), "layers list"),
        (lambda m: m.update(version=99), "known format version"),
        (lambda m: m.update(version=True), "known format version"),
    ],
)
def test_force_refuses_store_shaped_folder_with_bad_manifest(tmp_path, hf_src, edit, match):
    store = quiet_convert(hf_src, tmp_path / "s.llmflash", dtype="float32")
    m = json.loads((store / "manifest.json").read_text())
    edit(m)
    (store / "manifest.json").write_text(json.dumps(m))
    before = snapshot(store)
    with pytest.raises(ConvertError, match=match):
        quiet_convert(hf_src, store, force=True)
    assert snapshot(store) == before


def test_force_refuses_symlink_or_folder_under_a_store_name(tmp_path, hf_src):
    """Store file names that are not regular files (a link to a user's file, a folder) are refused."""
    store = quiet_convert(hf_src, tmp_path / "s.llmflash", dtype="float32")
    precious = tmp_path / "precious.txt"
    precious.write_text("keep")
    (store / "predictors.safetensors").symlink_to(precious)
    with pytest.raises(ConvertError, match="'predictors.safetensors' in it is not a regular file"):
        quiet_convert(hf_src, store, force=True)
    assert precious.read_text() == "keep" and (store / "predictors.safetensors").is_symlink()
    (store / "predictors.safetensors").unlink()
    (store / ".predictors.safetensors.tmp-1").mkdir()
    with pytest.raises(ConvertError, match="not a regular file"):
        quiet_convert(hf_src, store, force=True)


def test_force_replaces_store_holding_its_own_temporary_file(tmp_path, hf_src):
    """A store's own `.FILE.tmp-PID` (store.replace_file, e.g. calibrate killed) does not stop --force."""
    store = quiet_convert(hf_src, tmp_path / "s.llmflash", dtype="float32")
    for n in (".notes.tmp-1", ".ffn.bin.tmp-", ".ffn.bin.tmp-1.txt"):  # not store.replace_file's
        (store / n).write_bytes(b"mine")
        with pytest.raises(ConvertError, match=re.escape(repr(n))):
            quiet_convert(hf_src, store, force=True)
        (store / n).unlink()
    (store / f".predictors.safetensors.tmp-{os.getpid()}").write_bytes(b"partial")
    quiet_convert(hf_src, store, dtype="bfloat16", force=True)
    assert Store(store).dtype_name == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.llmflash"]
