"""Where a conversion writes: the checks on its destination and the swap that replaces an old store.

What is guaranteed:
- Without `force` the destination must not exist. With `force` it is replaced only when it is an
  empty folder or an llmflash store: a folder whose every entry, hidden ones included, is a
  regular file the store format defines (store.KNOWN_FILES, or a store's own `.FILE.tmp-PID`
  temporary file) and whose manifest.json parses as a store's (a JSON object, format
  "llmflash-store", a known version, a config object, a layers list). Anything else (a folder
  holding any other entry, a file, a symbolic link) is refused with a ConvertError naming the
  destination and the offending entry, before any work, and nothing is deleted. Neither the
  source nor the destination may contain the other (paths compared resolved).
- The new store is written to `.NAME.tmp-PID` beside the destination and appears in one rename.
  An old store is replaced by exchanging the two folders atomically (Linux renameat2 with
  RENAME_EXCHANGE): at every instant the destination names a complete store, the old or the
  new; the old one, now under the temporary name, is then deleted. Where the kernel or file
  system cannot exchange, the old store is renamed aside to `.NAME.old-PID`, the new one renamed
  in, the old one deleted; a failure in between puts the old one back.
- A killed conversion leaves only those hidden siblings. The next conversion to the destination
  or the next opening of the store (llmflash.store.leftovers.recover) deletes the ones of dead
  processes, and first renames an old store back if a kill between the two renames left the
  destination missing. Leftovers of live processes are never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvertError
from ..store import leftovers


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
    """Why the folder `path` is not an llmflash store --force may replace; None when it is one:
    every entry, hidden ones included, a regular file the store format defines (or a store's own
    `.FILE.tmp-PID` temporary file), and a manifest.json that parses as a store's."""
    try:
        return leftovers.store_problem(path)
    except OSError as e:
        return f"it cannot be listed ({e.strerror})"


def check_destination(dst: Path, src: Path | None, force: bool) -> str:
    """Refuse (ConvertError naming dst, nothing touched) a destination a conversion must not
    write: one that is, contains or lies inside the source; one that exists, without `force`;
    with `force`, anything but an llmflash store or an empty folder (a non-empty folder that is
    not a store, a file, a symbolic link: the link is refused rather than followed or replaced,
    so that neither its target nor the link is lost by surprise).
    Before looking at dst, recovers or deletes what dead processes' interrupted conversions left
    beside it (llmflash.store.leftovers.recover): a destination a kill left missing comes back.
    Returns "absent", "empty" or "store": what the finished store replaces."""
    if src is not None:
        if _inside(dst, src):
            raise ConvertError(
                "the destination must not be the source folder or inside it"
                if dst.resolve() != src.resolve()
                else "the destination is the source itself",
                dst,
            )
        if _inside(src, dst):
            raise ConvertError(f"the destination contains the source {src}: replacing it would delete the source", dst)
    leftovers.recover(dst)
    if not os.path.lexists(dst):
        return "absent"
    if not force:
        raise ConvertError("destination already exists (pass --force to replace it)", dst)
    refuse = "--force only replaces an llmflash store or an empty folder, and"
    if dst.is_symlink():
        raise ConvertError(
            f"{refuse} this is a symbolic link (to {os.readlink(dst)}): remove the link or "
            "give its target as the destination",
            dst,
        )
    if not dst.is_dir():
        raise ConvertError(f"{refuse} this is a file, not a folder: remove it or choose another destination", dst)
    with os.scandir(dst) as entries:
        if next(entries, None) is None:
            return "empty"
    why = _store_problem(dst)
    if why is not None:
        raise ConvertError(
            f"{refuse} {why}: nothing was deleted; remove it yourself or choose another destination", dst
        )
    return "store"


def _discard(path: Path) -> None:
    """Delete our own temporary folder, best effort, never following a symbolic link."""
    try:
        leftovers.remove_tree(path)
    except OSError:
        pass


def clear_own_leftover(path: Path) -> None:
    """Delete `path`, a `.NAME.tmp-PID` / `.NAME.old-PID` name with this process's PID, left by an
    earlier conversion of ours; a ConvertError (nothing deleted) if it holds anything but store
    files: then it is not ours."""
    if not os.path.lexists(path):
        return
    if not leftovers.holds_only_store_files(path):
        raise ConvertError(
            "this name is the one a conversion uses for its temporary folder, and it holds "
            "files that are not a store's: move it away",
            path,
        )
    leftovers.remove_tree(path)


def swap_in(tmp: Path, dst: Path, old: Path) -> None:
    """Replace the old store at dst with the new one at tmp. Atomic exchange where the kernel
    allows (after it, tmp holds the old store, which is deleted); else old aside to `old`, new
    in, old deleted, and a failure before the new one is in puts the old one back."""
    clear_own_leftover(old)
    try:
        exchanged = leftovers.exchange(tmp, dst)
    except BaseException:
        _discard(tmp)
        raise
    if exchanged:
        fsync_dir(dst.parent)  # the new store durable at dst before the old goes
        _discard(tmp)
        return
    try:
        os.rename(dst, old)
    except BaseException:
        _discard(tmp)
        raise
    try:
        os.rename(tmp, dst)
    except BaseException:
        try:
            os.rename(old, dst)
        except OSError as e:
            raise ConvertError(f"could not put the old store back ({e}); it is kept at {old}", dst) from None
        finally:
            _discard(tmp)
        raise
    fsync_dir(dst.parent)
    _discard(old)
