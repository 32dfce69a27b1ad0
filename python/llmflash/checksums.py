"""Whole-file checksums of a store (format version 4), the manifest's own checksum, and the
careful reading and atomic writing of store files. llmflash.store documents the format.

File checksums (version 4): the manifest's `files` records, for resident.safetensors,
bundles.crc32, tokenizer.json (when there is one) and predictors.safetensors (once calibrated),
{"bytes": size, "crc32": zlib CRC-32 of the whole file}; `manifest_crc32` is the CRC-32 of the
manifest itself, over its canonical JSON without that field (json.dumps(m, sort_keys=True,
separators=(",", ":")), ASCII). ffn.bin needs no whole-file entry: its regions' and bundles' CRCs
cover every byte a model reads. Checked where each is loaded, streaming the file in chunks
(memory stays flat, the hash runs at disk speed): the manifest and the recorded sizes at open,
resident.safetensors once per Store on its first load (resident(), up_biases()), bundles.crc32
on its first read, tokenizer.json when loaded, predictors.safetensors when loaded
(predictor_file.load_predictors; calibrate records a new file's entry after writing it, so an
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

from .errors import StoreError

HASH_CHUNK = 8 << 20                 # bytes read at a time when hashing a file


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` atomically: `write(tmp)` fills a hidden sibling, which is fsynced and then
    renamed over `path`; on any failure the sibling is removed and `path` is untouched."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
    except RecursionError:                   # '[' * 200000: deeper than the parser's stack
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
        raise StoreError(f"checksum mismatch ({size} bytes, CRC-32 {crc:#010x}; the manifest records "
                         f"{rec['bytes']} bytes, {rec['crc32']:#010x}): the file is corrupt or was changed "
                         f"after {when}; {hint}", path)


def check_finite(name: str, t: torch.Tensor, path: Path) -> None:
    """StoreError unless every value of float tensor `t` is finite: min and max at memory speed
    (NaN propagates to both, an Inf shows as one of them)."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
        raise StoreError(f"{name} holds non-finite values (NaN or Inf): the weights are corrupt", path)
