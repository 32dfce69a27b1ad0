"""What an interrupted store replacement leaves, and how it is recovered.

A conversion writes its store into a hidden sibling of the destination, `.NAME.tmp-PID`, and
makes it visible with one rename. Replacing an existing store (`convert --force`) exchanges the
two folders atomically where the kernel can (Linux renameat2 with RENAME_EXCHANGE: the
destination always names a complete store, the old one or the new one); elsewhere the old store
is first renamed aside to `.NAME.old-PID`, so a kill between the two renames leaves no
destination, and the old store only under that hidden name. Inside a store, a file being
replaced is written as `.FILE.tmp-PID` (checksums.replace_file).

`recover(dst)` runs when a store is opened and before a conversion writes `dst`. It looks only
at names of exactly those forms whose PID is not a live process on this machine (os.kill(pid, 0)
fails with ProcessLookupError): if `dst` is missing and such a `.NAME.old-PID` holds a complete
store, that store is renamed back to `dst`; every other such leftover folder (or, inside the
store, file) is deleted, except a complete old store while `dst` is still missing. Symbolic
links are neither followed nor deleted; leftovers of a live process, and names of any other
form, are never touched. PIDs are this machine's: a folder shared with another machine (a
network file system) that converts into it at the same moment is not protected. Recovery is
best effort: a leftover it cannot remove stays, and it never makes opening a store fail.

The store-shape check (`store_problem`) also lives here: it decides both what `convert --force`
may replace and which `.old-PID` folder is a store worth putting back.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shutil
import stat
import sys
from pathlib import Path

from . import layout as S

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# SYS_renameat2 by machine, for a C library without a renameat2() wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {
    "x86_64": 316,
    "amd64": 316,
    "aarch64": 276,
    "arm64": 276,
    "riscv64": 276,
    "i386": 353,
    "i686": 353,
    "ppc64le": 357,
    "ppc64": 357,
    "s390x": 347,
}
# The kernel or the file system cannot do this kind of rename: fall back to plain renames.
UNSUPPORTED = frozenset({errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)})
_LEFTOVER = re.compile(r"(tmp|old)-([1-9][0-9]{0,9})")
_FILE_TMP = re.compile(r"\.(.+)\.tmp-([1-9][0-9]{0,9})")
_libc_call = None


def _make_call(libc, machine: str):
    """A callable (src: bytes, dst: bytes, flags: int) -> int (0, or -1 with errno set) on
    `libc`'s renameat2() wrapper, else on syscall(SYS_renameat2) when `machine`'s number is
    known; None when neither is there."""
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    nr = _SYS_RENAMEAT2.get(machine.lower())
    if nr is None or not hasattr(libc, "syscall"):
        return None
    sc = libc.syscall
    sc.restype = ctypes.c_long
    return lambda a, b, flags: sc(
        ctypes.c_long(nr),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(a),
        ctypes.c_int(_AT_FDCWD),
        ctypes.c_char_p(b),
        ctypes.c_uint(flags),
    )


def _renameat2_function():
    """This process's renameat2 callable (see _make_call), or None off Linux."""
    global _libc_call
    if _libc_call is None:
        _libc_call = False
        if sys.platform.startswith("linux"):
            try:
                _libc_call = _make_call(ctypes.CDLL(None, use_errno=True), platform.machine()) or False
            except OSError:
                pass
    return _libc_call or None


def renameat2(src: Path, dst: Path, flags: int) -> int:
    """renameat2(2): 0 when done, else the errno (ENOSYS where the platform has no renameat2)."""
    fn = _renameat2_function()
    if fn is None:
        return errno.ENOSYS
    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return 0
    return ctypes.get_errno() or errno.EIO


def exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` (both exist) in one atomic step. False, with nothing changed,
    where the kernel or file system cannot (the caller falls back to plain renames); any other
    failure is an OSError."""
    err = renameat2(a, b, RENAME_EXCHANGE)
    if err == 0:
        return True
    if err in UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename `src` to `dst` only if `dst` does not exist (FileExistsError otherwise): atomic
    with renameat2's RENAME_NOREPLACE, else checked just before a plain rename."""
    err = renameat2(src, dst, RENAME_NOREPLACE)
    if err == 0:
        return
    if err not in UNSUPPORTED:
        raise OSError(err, os.strerror(err), os.fspath(src), None, os.fspath(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(dst))
    os.rename(src, dst)


def remove_tree(path: Path) -> None:
    """Delete the folder `path` without following symbolic links (a link inside it is removed,
    never its target); anything but a real folder at `path` (a symbolic link, a file) is left
    as it is. Raises OSError when it cannot."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)


def pid_alive(pid: int) -> bool:
    """False only when no process `pid` exists on this machine (kept when unsure)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError, ValueError):  # EPERM: someone else's live process
        return True
    return True


def _is_store_file(name: str) -> bool:
    """A name a store folder may hold: a store file, or checksums.replace_file's temporary one."""
    if name in S.KNOWN_FILES:
        return True
    m = _FILE_TMP.fullmatch(name)
    return m is not None and m.group(1) in S.KNOWN_FILES


def manifest_problem(path: Path) -> str | None:
    """Why `path` (a manifest.json) does not parse as a store's manifest; None when it does:
    a JSON object with format "llmflash-store", a known version, a config object and a layers
    list. Only the shape: Store() validates the rest."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        if st.st_size > S.MAX_MANIFEST_BYTES:
            return f"over the {S.MAX_MANIFEST_BYTES}-byte cap"
        with open(path, "rb") as f:
            m = json.loads(f.read(S.MAX_MANIFEST_BYTES + 1))
    except OSError as e:
        return f"unreadable: {e.strerror}"
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: hostile nesting
        return "not valid JSON"
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != S.FORMAT:
        return f"no format {S.FORMAT!r}"
    v = m.get("version")
    if type(v) is not int or not S.V1 <= v <= S.VQ:
        return "no known format version"
    if not isinstance(m.get("config"), dict):
        return "no config object"
    if not isinstance(m.get("layers"), list):
        return "no layers list"
    return None


def store_problem(folder: Path) -> str | None:
    """Why the folder `folder` is not an llmflash store (by shape); None when it is one: every
    entry, hidden ones included, a regular file the store format defines (or one of
    checksums.replace_file's `.FILE.tmp-PID` files), and a manifest.json that parses as a store's."""
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        if not _is_store_file(e.name):
            return f"{e.name!r} in it is not an llmflash store file"
        if not e.is_file(follow_symlinks=False):
            return f"{e.name!r} in it is not a regular file, as in an llmflash store"
    if S.MANIFEST not in {e.name for e in entries}:
        return f"it has no {S.MANIFEST}: not an llmflash store"
    why = manifest_problem(folder / S.MANIFEST)
    return None if why is None else f"its {S.MANIFEST} is not an llmflash store manifest ({why})"


def is_complete_store(folder: Path) -> bool:
    """A real folder shaped as a store (store_problem) that holds its three required files."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode) or store_problem(folder) is not None:
            return False
        return all(stat.S_ISREG(os.lstat(folder / n).st_mode) for n in (S.MANIFEST, S.RESIDENT, S.FFN))
    except OSError:
        return False


def holds_only_store_files(folder: Path) -> bool:
    """A real folder whose every entry is a regular file with a store file's name (or a store
    file's temporary name), as a conversion's temporary folder or an old store is: what recovery
    may delete. A folder a user named like a leftover but filled with anything else is kept."""
    try:
        if not stat.S_ISDIR(os.lstat(folder).st_mode):
            return False
        with os.scandir(folder) as it:
            return all(_is_store_file(e.name) and e.is_file(follow_symlinks=False) for e in it)
    except OSError:
        return False


def find_leftovers(dst: Path) -> list[tuple[Path, str, int]]:
    """(path, "tmp" or "old", pid) of every `.NAME.tmp-PID` / `.NAME.old-PID` beside `dst`, any PID."""
    name = dst.name
    if name in ("", ".", ".."):
        return []
    prefix, found = f".{name}.", []
    with os.scandir(dst.parent) as it:  # the one listing of the parent
        for e in it:
            if e.name.startswith(prefix):
                m = _LEFTOVER.fullmatch(e.name[len(prefix) :])
                if m is not None:
                    found.append((dst.parent / e.name, m.group(1), int(m.group(2))))
    return found


def _mtime(folder: Path) -> float:
    try:
        return os.lstat(folder / S.MANIFEST).st_mtime
    except OSError:
        return 0.0


def recover(dst: str | os.PathLike[str]) -> None:
    """Recover or clean what dead processes' interrupted conversions left beside the store
    `dst` (and their temporary files inside it): see the module docstring. Best effort, silent."""
    dst = Path(dst)
    try:
        dead = [(p, kind) for p, kind, pid in find_leftovers(dst) if not pid_alive(pid)]
    except OSError:
        dead = []
    if dead and not os.path.lexists(dst):
        olds = sorted((p for p, kind in dead if kind == "old" and is_complete_store(p)), key=_mtime, reverse=True)
        for old in olds:
            try:
                rename_noreplace(old, dst)
            except OSError:
                continue
            dead.remove((old, "old"))
            break
    for p, kind in dead:  # an old store is kept only while it is the only copy of dst
        if not holds_only_store_files(p):  # not ours after all: never deleted
            continue
        if kind == "tmp" or os.path.lexists(dst) or not is_complete_store(p):
            try:
                remove_tree(p)
            except OSError:
                pass
    _clean_inside(dst)


def _clean_inside(folder: Path) -> None:
    """Delete checksums.replace_file's `.FILE.tmp-PID` files of dead processes inside the store."""
    try:
        with os.scandir(folder) as it:
            names = [e.name for e in it if e.name.startswith(".") and e.is_file(follow_symlinks=False)]
    except OSError:
        return
    for n in names:
        m = _FILE_TMP.fullmatch(n)
        if m is not None and m.group(1) in S.KNOWN_FILES and not pid_alive(int(m.group(2))):
            try:
                os.unlink(folder / n)
            except OSError:
                pass
