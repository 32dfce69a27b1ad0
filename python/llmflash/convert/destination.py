"""Where a conversion writes: the checks on its destination and the swap that replaces an old store.

The destination (check_destination): without `force` it must not exist. With `force` it is
replaced only when it is an llmflash store (a folder whose manifest.json says format
"llmflash-store" and which holds nothing but store files) or an empty folder; a folder holding
anything else, a file or a symbolic link is refused before any work, and nothing is deleted.
Neither the source nor the destination may contain the other (paths compared resolved). An old
store is removed only once the new one is complete: it is renamed aside (.NAME.old-PID), the new
one renamed in, then the old one deleted; if renaming in fails the old one is put back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .. import store as S
from ..errors import ConvertError

def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable (best effort: not every platform opens folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _inside(inner: Path, outer: Path) -> bool:
    """True when `inner` is `outer` or lies inside it. Resolved paths (symlinks followed), and,
    where both exist, device/inode identity (bind mounts, case-insensitive file systems)."""
    ri, ro = inner.resolve(), outer.resolve()
    if ri == ro or ro in ri.parents:
        return True
    if not ro.exists():
        return False
    for p in (ri, *ri.parents):
        try:
            if p.exists() and os.path.samefile(p, ro):
                return True
        except OSError:
            pass
    return False


def _store_problem(path: Path) -> str | None:
    """Why the folder `path` is not an llmflash store --force may replace; None when it is one
    (manifest.json a JSON object with format "llmflash-store", nothing but store files)."""
    mpath = path / S.MANIFEST
    if mpath.is_symlink() or not mpath.is_file():
        return f"it is a non-empty folder without {S.MANIFEST}, not an llmflash store"
    try:
        if mpath.stat().st_size > S.MAX_MANIFEST_BYTES:
            raise ValueError("too large")
        m = json.loads(mpath.read_bytes())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):   # RecursionError: hostile nesting
        m = None
    if not isinstance(m, dict) or m.get("format") != S.FORMAT:
        return f"its {S.MANIFEST} is not an llmflash store manifest (format {S.FORMAT!r})"
    for entry in sorted(os.listdir(path)):
        p = path / entry
        known = entry in S.KNOWN_FILES or entry.startswith(".")       # hidden: temporary files
        if not known or p.is_symlink() or not p.is_file():
            return f"it holds {entry!r}, which is not part of an llmflash store"
    return None


def check_destination(dst: Path, src: Path | None, force: bool) -> str:
    """Refuse (ConvertError naming dst, nothing touched) a destination a conversion must not
    write: one that is, contains or lies inside the source; one that exists, without `force`;
    with `force`, anything but an llmflash store or an empty folder (a non-empty folder that is
    not a store, a file, a symbolic link: the link is refused rather than followed or replaced,
    so that neither its target nor the link is lost by surprise).
    Returns "absent", "empty" or "store": what the finished store replaces."""
    if src is not None:
        if _inside(dst, src):
            raise ConvertError("the destination must not be the source folder or inside it"
                               if dst.resolve() != src.resolve() else "the destination is the source itself", dst)
        if _inside(src, dst):
            raise ConvertError(f"the destination contains the source {src}: replacing it would delete the source",
                               dst)
    if not os.path.lexists(dst):
        return "absent"
    if not force:
        raise ConvertError("destination already exists (pass --force to replace it)", dst)
    refuse = "--force only replaces an llmflash store or an empty folder, and"
    if dst.is_symlink():
        raise ConvertError(f"{refuse} this is a symbolic link (to {os.readlink(dst)}): remove the link or "
                           "give its target as the destination", dst)
    if not dst.is_dir():
        raise ConvertError(f"{refuse} this is a file, not a folder: remove it or choose another destination", dst)
    with os.scandir(dst) as entries:
        if next(entries, None) is None:
            return "empty"
    why = _store_problem(dst)
    if why is not None:
        raise ConvertError(f"{refuse} {why}: nothing was deleted; remove it yourself or choose another "
                           "destination", dst)
    return "store"


def swap_in(tmp: Path, dst: Path, old: Path) -> None:
    """Replace the old store at dst: aside, new in, old deleted. The old one is lost only
    once the new one is in place; a failure before that puts it back."""
    if os.path.lexists(old):                 # our own leftover (same pid, earlier run)
        shutil.rmtree(old)
    try:
        os.rename(dst, old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, dst)
    except BaseException:
        try:
            os.rename(old, dst)
        except OSError as e:
            raise ConvertError(f"could not put the old store back ({e}); it is kept at {old}",
                               dst) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
