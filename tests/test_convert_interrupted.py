"""A conversion killed at any point never loses the destination, and what it leaves beside it
(`.NAME.tmp-PID`, `.NAME.old-PID`) is recovered or deleted by the next `convert` to that
destination or the next opening of the store (llmflash.store.leftovers), unless its process still runs.

Kills are real: a child process converts with a hook that calls os._exit at the chosen moment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import build_hf
from store_builders import write_store

from llmflash.convert.hf import convert_hf
from llmflash.errors import ConvertError, StoreError
from llmflash.store import Store, leftovers

TESTS = Path(__file__).parent
CHILD = r"""
import os, sys, warnings
from pathlib import Path
warnings.simplefilter("ignore")
from llmflash.store import leftovers
from llmflash.convert.hf import convert_hf
from llmflash.convert.writer import StoreWriter
mode, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "between-renames":               # no exchange here: two renames, killed between them
    leftovers.renameat2 = lambda a, b, flags: 38          # ENOSYS
    real_rename = os.rename
    def rename(a, b):
        real_rename(a, b)
        if Path(a).name == dst.name:
            os._exit(9)
    os.rename = rename
elif mode == "after-exchange":              # killed once the exchange is done, before the old is deleted
    real_exchange = leftovers.exchange
    def exchange(a, b):
        if real_exchange(a, b):
            os._exit(9)
        os._exit(3)
    leftovers.exchange = exchange
elif mode == "mid-conversion":
    real_write = StoreWriter.write_layer
    def write_layer(self, i, *a, **k):
        if i == 1:
            os._exit(9)
        return real_write(self, i, *a, **k)
    StoreWriter.write_layer = write_layer
convert_hf(src, dst, dtype="bfloat16", force=True)
os._exit(0)
"""


def killed_convert(mode: str, src: Path, dst: Path) -> int:
    """Run CHILD in a new process; returns its (now dead, reaped) pid after checking it was killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "python"), str(TESTS)])}
    p = subprocess.Popen(
        [sys.executable, "-c", CHILD, mode, str(src), str(dst)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = p.communicate(timeout=300)
    if p.returncode == 3:
        pytest.skip("this kernel or file system has no renameat2(RENAME_EXCHANGE)")
    assert p.returncode == 9, err.decode()[-2000:]
    return p.pid


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def live_pid():
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def quiet_convert(src: Path, dst: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_hf(src, dst, **kw)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory) -> Path:
    return build_hf("llama", tmp_path_factory.mktemp("interrupted") / "hf").path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("pristine") / "p.llmflash")


@pytest.mark.parametrize("recover_by", ["open", "convert", "convert --force"])
def test_killed_between_the_two_renames(tmp_path, hf_src, recover_by):
    """Where the swap takes two renames, a kill between them leaves no destination: the next
    open or convert puts the old store back, and no leftover stays."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    pid = killed_convert("between-renames", hf_src, dst)
    assert not dst.exists() and names(tmp_path) == [f".m.llmflash.old-{pid}", f".m.llmflash.tmp-{pid}"]
    if recover_by == "open":
        assert Store(dst).dtype_name == "float32"
    elif recover_by == "convert":
        with pytest.raises(ConvertError, match="already exists"):  # the old store is back, so kept
            quiet_convert(hf_src, dst)
        assert Store(dst).dtype_name == "float32"
    else:
        quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
        assert Store(dst).dtype_name == "bfloat16"
    assert names(tmp_path) == ["m.llmflash"]


def test_killed_after_the_exchange(tmp_path, hf_src):
    """With the atomic exchange the destination is never missing: killed right after it, the
    new store is in place and the old one, under the temporary name, is deleted by the next open."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    pid = killed_convert("after-exchange", hf_src, dst)
    assert names(tmp_path) == [f".m.llmflash.tmp-{pid}", "m.llmflash"]
    assert Store(dst).dtype_name == "bfloat16"
    assert names(tmp_path) == ["m.llmflash"]


@pytest.mark.parametrize("recover_by", ["open", "convert --force"])
def test_killed_mid_conversion(tmp_path, hf_src, recover_by):
    """A kill while writing leaves the old store untouched and a partial `.tmp-PID`, which the
    next open or convert removes."""
    dst = quiet_convert(hf_src, tmp_path / "m.llmflash", dtype="float32")
    pid = killed_convert("mid-conversion", hf_src, dst)
    assert names(tmp_path) == [f".m.llmflash.tmp-{pid}", "m.llmflash"]
    if recover_by == "open":
        assert Store(dst).dtype_name == "float32"
    else:
        quiet_convert(hf_src, dst, dtype="bfloat16", force=True)
        assert Store(dst).dtype_name == "bfloat16"
    assert names(tmp_path) == ["m.llmflash"]


def test_killed_first_conversion_cleaned_by_next(tmp_path, hf_src):
    dst = tmp_path / "new.llmflash"
    pid = killed_convert("mid-conversion", hf_src, dst)
    assert names(tmp_path) == [f".new.llmflash.tmp-{pid}"]
    quiet_convert(hf_src, dst, dtype="float32")
    assert names(tmp_path) == ["new.llmflash"]


def test_open_of_missing_store_cleans_partial_tmp(tmp_path):
    """No store, only a dead conversion's partial folder: the open fails as before, and the
    folder is gone."""
    partial = tmp_path / f".m.llmflash.tmp-{dead_pid()}"
    partial.mkdir()
    (partial / "ffn.bin").write_bytes(b"\0" * 4096)
    with pytest.raises(StoreError, match="no such store folder"):
        Store(tmp_path / "m.llmflash")
    assert names(tmp_path) == []


def test_newest_complete_old_store_is_restored(tmp_path, pristine):
    """The destination missing, dead processes' `.old-PID` folders: the newest complete store is
    put back, an incomplete one is never chosen, and the rest are deleted."""
    dst = tmp_path / "m.llmflash"
    older, newer, broken = (tmp_path / f".m.llmflash.old-{dead_pid()}" for _ in range(3))
    for p in (older, newer, broken):
        shutil.copytree(pristine, p)
    os.utime(older / "manifest.json", (1, 1))
    os.utime(broken / "manifest.json", (2**31, 2**31))
    (broken / "ffn.bin").unlink()
    newest = (newer / "manifest.json").stat().st_ino  # a rename keeps the inode
    Store(dst)
    assert (dst / "manifest.json").stat().st_ino == newest
    assert names(tmp_path) == ["m.llmflash"]


def test_live_process_leftovers_are_kept(tmp_path, hf_src, pristine, live_pid):
    """A running conversion's folders are never touched, even with the destination missing."""
    dst = tmp_path / "m.llmflash"
    tmp, old = tmp_path / f".m.llmflash.tmp-{live_pid}", tmp_path / f".m.llmflash.old-{live_pid}"
    shutil.copytree(pristine, old)
    tmp.mkdir()
    (tmp / "ffn.bin").write_bytes(b"partial")
    inner = f".predictors.safetensors.tmp-{live_pid}"
    gone = tmp_path / f".m.llmflash.tmp-{dead_pid()}"  # a dead one beside them goes
    gone.mkdir()
    with pytest.raises(StoreError, match="no such store folder"):
        Store(dst)
    assert names(tmp_path) == sorted([tmp.name, old.name])
    quiet_convert(hf_src, dst, dtype="float32")  # not put back: the destination is free
    assert names(tmp_path) == sorted([tmp.name, old.name, dst.name])
    (dst / inner).write_bytes(b"partial")
    Store(dst)
    assert names(tmp_path) == sorted([tmp.name, old.name, dst.name]) and (dst / inner).exists()


def test_dead_temporary_files_inside_a_store_are_removed(tmp_path, pristine):
    dst = shutil.copytree(pristine, tmp_path / "m.llmflash")
    dead, mine = f".predictors.safetensors.tmp-{dead_pid()}", f".manifest.json.tmp-{os.getpid()}"
    for n in (dead, mine, ".my_notes.txt"):
        (dst / n).write_bytes(b"x")
    Store(dst)
    assert not (dst / dead).exists() and (dst / mine).exists() and (dst / ".my_notes.txt").exists()


def test_only_the_exact_pattern_is_touched(tmp_path, pristine):
    """Names close to the pattern, other stores' leftovers and symbolic links stay as they are."""
    pid = dead_pid()
    dst = shutil.copytree(pristine, tmp_path / "m.llmflash")
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    keep = [
        f".m.llmflash.tmp-{pid}x",
        f".m.llmflash.tmp-{pid}.bak",
        ".m.llmflash.tmp-",
        ".m.llmflash.tmp-0",
        f"m.llmflash.tmp-{pid}",
        f".n.llmflash.tmp-{pid}",
        f".m.llmflash.new-{pid}",
        f".m.llmflashtmp-{pid}",
        f".m.llmflash.tmp--{pid}",
        f".m.llmflash.old-0{pid}",
    ]
    for n in keep:
        (tmp_path / n).mkdir()
        (tmp_path / n / "f").write_text("keep")
    (tmp_path / f".m.llmflash.old-{pid}").symlink_to(target, target_is_directory=True)
    (tmp_path / f".m.llmflash.tmp-{pid}").write_text("a file, not a conversion's folder")
    before = names(tmp_path)
    (tmp_path / f".m.llmflash.old-{dead_pid()}").mkdir()  # the one real leftover: deleted
    Store(dst)
    assert names(tmp_path) == before
    assert (target / "precious").read_text() == "keep"
    assert all((tmp_path / n / "f").read_text() == "keep" for n in keep)


def test_symlinks_inside_a_leftover_are_not_followed(tmp_path, pristine):
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("keep")
    dst = shutil.copytree(pristine, tmp_path / "m.llmflash")
    tmp = tmp_path / f".m.llmflash.tmp-{dead_pid()}"
    tmp.mkdir()
    (tmp / "link").symlink_to(target, target_is_directory=True)
    Store(dst)  # a link is nothing a conversion writes: the folder is not ours, kept
    assert os.path.islink(tmp / "link") and (target / "precious").read_text() == "keep"


def test_opening_lists_the_parent_once(tmp_path, pristine, monkeypatch):
    """Opening a store without leftovers costs one listing of its parent (and one of the store)."""
    dst = shutil.copytree(pristine, tmp_path / "m.llmflash")
    listed = []
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": listed.append(Path(p)) or real(p))
    Store(dst)
    assert listed.count(tmp_path) == 1


def test_unlistable_parent_does_not_stop_opening(tmp_path, pristine, monkeypatch):
    """Recovery is best effort: the parent unreadable, the store opens (and is still cleaned)."""
    dst = shutil.copytree(pristine, tmp_path / "m.llmflash")
    inner = dst / f".manifest.json.tmp-{dead_pid()}"
    inner.write_text("{}")
    real = os.scandir

    def scandir(p="."):
        if Path(p) == tmp_path:
            raise PermissionError(13, "Permission denied", str(p))
        return real(p)

    monkeypatch.setattr(os, "scandir", scandir)
    assert Store(dst).config.n_layers >= 1 and not inner.exists()


def test_recover_never_raises_on_odd_paths(tmp_path):
    for p in (tmp_path / "missing" / "deeper", Path("/"), Path("."), tmp_path / "file"):
        leftovers.recover(p)
    (tmp_path / "file").write_text("x")
    leftovers.recover(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"


def test_folders_named_like_leftovers_but_not_ours_are_kept(tmp_path, pristine):
    """A folder that only looks like a leftover (the pattern's name, a dead PID) but holds a
    user's files is never deleted, by an open, a convert or a conversion of this process."""
    dst = tmp_path / "s"
    shutil.copytree(pristine, dst)
    mine = {dst.parent / f".s.tmp-{dead_pid()}": "notes.txt", dst.parent / f".s.old-{dead_pid()}": "thesis.tex"}
    for folder, name in mine.items():
        folder.mkdir()
        (folder / name).write_text("a user's work")
    Store(dst)  # recovery runs at open
    leftovers.recover(dst)
    for folder, name in mine.items():
        assert (folder / name).read_text() == "a user's work"
    own = dst.parent / f".t.tmp-{os.getpid()}"  # the name this process would write to
    own.mkdir()
    (own / "notes.txt").write_text("mine")
    with pytest.raises(ConvertError, match="not a store's"):
        write_store(dst.parent / "t")
    assert (own / "notes.txt").read_text() == "mine"
