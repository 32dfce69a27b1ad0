"""Whole-file checksums of a store (format version 4), the manifest's own checksum, and the
careful reading and atomic writing of store files. store/layout.py describes the format.

File checksums (version 4): the manifest's `files` records, for resident.safetensors,
bundles.crc32, tokenizer.json (when there is one) and predictors.safetensors (once calibrated),
{"bytes": size, "crc32": zlib CRC-32 of the whole file}; `manifest_crc32` is the CRC-32 of the
manifest itself, over its canonical JSON without that field (json.dumps(m, sort_keys=True,
separators=(",", ":")), ASCII). ffn.bin needs no whole-file entry: its regions' and bundles' CRCs
cover every byte a model reads. Checked where each is loaded, streaming the file in chunks
(memory stays flat, the hash runs at disk speed): the manifest and the recorded sizes at open,
resident.safetensors once per Store on its first load (resident(), up_biases()), bundles.crc32
on its first read, tokenizer.json when loaded, predictors.safetensors when loaded
(where the predictors file is loaded; calibrate records a new file's entry after writing it, so an
interrupted calibrate is caught there, not at open, and can be re-run); `llmflash verify` checks
them all. A mismatch is a StoreError naming the file: corrupt, or changed after conversion.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import StoreError

HASH_CHUNK = 8 << 20  # bytes read at a time when hashing a file
MAX_FILE_BYTES = 1 << 50  # the largest size or offset a manifest may state


def manifest_int(v: Any, what: str, path: Path, lo: int = 0, hi: int = MAX_FILE_BYTES) -> int:
    """`v` when it is an int (not a bool, not a float such as 1e400) in [lo, hi]; otherwise a
    StoreError naming the manifest field `what`."""
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise StoreError(f"{what} = {v!r:.60} is not an integer in [{lo}, {hi}]", path)
    return v


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` atomically: `write(tmp)` fills a hidden sibling, which is fsynced and then
    renamed over `path`; on any failure the sibling is removed and `path` is untouched. A write
    that fails (disk full, permissions; safetensors' own SafetensorError) is a StoreError naming
    `path`."""
    from safetensors import SafetensorError

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise StoreError(f"cannot write the file: {os_reason(e)}", path) from None
    except SafetensorError as e:
        raise StoreError(f"cannot write the file: {e}", path) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def os_reason(e: OSError) -> str:
    """An OSError's own reason ("Permission denied", "No space left on device"), without the path
    (the caller's error names the file)."""
    if e.strerror:
        return e.strerror
    return os.strerror(e.errno) if e.errno else str(e) or type(e).__name__


def file_crc32(path: Path) -> tuple[int, int]:
    """(bytes, zlib CRC-32) of a whole file, streamed HASH_CHUNK bytes at a time into one reused
    buffer (memory stays flat whatever the size). OSError as raised by open/read."""
    crc, total = 0, 0
    buf = bytearray(HASH_CHUNK)
    mv = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(mv)
            if not got:
                break
            crc = zlib.crc32(mv[:got], crc)
            total += got
    return total, crc


def file_entry(path: Path) -> dict[str, int]:
    """A manifest `files` entry for the file as it is now: {"bytes": size, "crc32": CRC-32}."""
    n, crc = file_crc32(path)
    return {"bytes": n, "crc32": crc}


def manifest_crc32(m: dict[str, Any]) -> int:
    """CRC-32 of the manifest's canonical JSON without its `manifest_crc32` field."""
    body = {k: v for k, v in m.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii"))


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r:.60}")
        out[k] = v
    return out


def parse_manifest(data: bytes, mpath: Path) -> dict[str, Any]:
    """The manifest's JSON object; a StoreError naming `mpath` if it is not valid JSON (or not
    UTF-8), not an object, nested too deeply or holds a key twice in one object."""
    try:
        m = json.loads(data, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise StoreError(f"manifest is not valid UTF-8 ({e.reason} at byte {e.start})", mpath) from None
    except ValueError as e:
        raise StoreError(f"manifest is not valid JSON ({e})", mpath) from None
    except RecursionError:  # '[' * 200000: deeper than the parser's stack
        raise StoreError("manifest is not valid JSON (nested too deeply)", mpath) from None
    if not isinstance(m, dict):
        raise StoreError("manifest is not a JSON object", mpath)
    return m


def compare_file(path: Path, rec: dict[str, int], when: str, hint: str) -> None:
    """Hash `path` and compare it with its record {"bytes", "crc32"}; a StoreError naming the file
    when it is missing, cannot be read (with the system's reason) or does not match (`when`:
    what wrote it, "conversion" or "calibration"; `hint`: the remedy)."""
    try:
        size, crc = file_crc32(path)
    except FileNotFoundError:
        raise StoreError(f"missing (the manifest records it); {hint}", path) from None
    except OSError as e:
        raise StoreError(f"cannot read: {os_reason(e)}", path) from None
    if (size, crc) != (rec["bytes"], rec["crc32"]):
        raise StoreError(
            f"checksum mismatch ({size} bytes, CRC-32 {crc:#010x}; the manifest records "
            f"{rec['bytes']} bytes, {rec['crc32']:#010x}): the file is corrupt or was changed "
            f"after {when}; {hint}",
            path,
        )


def is_finite(t: torch.Tensor) -> bool:
    """Whether every value of float tensor `t` is finite: min and max at memory speed (NaN
    propagates to both, an Inf shows as one of them; torch.isfinite(t).all() is many times slower)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def check_finite(name: str, t: torch.Tensor, path: Path) -> None:
    """StoreError unless every value of float tensor `t` is finite (is_finite)."""
    if not is_finite(t):
        raise StoreError(f"{name} holds non-finite values (NaN or Inf): the weights are corrupt", path)


def read_records(
    files: Any, folder: Path, mpath: Path, names: tuple[str, ...], required: tuple[str, ...], at_open: tuple[str, ...]
) -> dict[str, dict[str, int]]:
    """A version-4 manifest's `files` (its value `files`), each entry well formed and one of
    `names`, every one of `required` recorded; each of `at_open` that is recorded must be there at
    its recorded size (a cheap stat: the hashes run where each file is loaded), and one that is
    there must be recorded. StoreError naming the manifest or the file otherwise."""
    if not isinstance(files, dict):
        raise StoreError(f"files = {files!r:.40}: a version-4 manifest records its files' checksums", mpath)
    out: dict[str, dict[str, int]] = {}
    for name, e in files.items():
        if name not in names:
            raise StoreError(f"files[{name!r:.40}] is not a file with a recorded checksum ({', '.join(names)})", mpath)
        if not isinstance(e, dict) or set(e) != {"bytes", "crc32"}:
            raise StoreError(f'files[{name!r}] must be {{"bytes": N, "crc32": C}}', mpath)
        out[name] = {
            "bytes": manifest_int(e["bytes"], f"files[{name!r}].bytes", mpath),
            "crc32": manifest_int(e["crc32"], f"files[{name!r}].crc32", mpath, 0, 0xFFFFFFFF),
        }
    for name in required:
        if name not in out:
            raise StoreError(f"files[{name!r}] is missing: a version-4 manifest records it", mpath)
    for name in at_open:
        path = folder / name
        if name not in out:
            if path.exists():
                raise StoreError(
                    "not recorded in the manifest's files: added after conversion (convert again "
                    "with it, e.g. --tokenizer)",
                    path,
                )
            continue
        if not path.is_file():
            raise StoreError("missing (the manifest records it)", path)
        size = path.stat().st_size
        if size != out[name]["bytes"]:
            raise StoreError(
                f"file is {size} bytes but the manifest records {out[name]['bytes']}: truncated, "
                "or changed after conversion",
                path,
            )
    return out
