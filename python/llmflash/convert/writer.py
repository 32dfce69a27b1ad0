"""StoreWriter: writes a store atomically (a temporary sibling folder, renamed when complete).

Converters hand it the canonical resident tensors and, layer by layer, the FFN matrices in
Hugging Face layout; it bundles neuron i's gate row, up row and down column into one contiguous
record (llmflash.store documents the format), pads each layer's region to 4 KiB and records a
CRC-32 per region. OPT's fc1 bias is not in the bundle: converters pass it with the resident
tensors (layers.{i}.ffn.up_bias, in source order, which is the order the bundles are written).
An interrupted conversion leaves only the temporary folder, which is removed on the way out
(and ignored, never read, if the process was killed).

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
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import store as S
from ..errors import ConvertError
from ..models.config import ModelConfig


class StoreWriter:
    def __init__(self, dst: str | os.PathLike[str], config: ModelConfig, dtype: str = "float16",
                 source: str = "", force: bool = False, src: str | os.PathLike[str] | None = None):
        """`source`: recorded in the manifest. `src`: the path converted from, if any; the
        destination must neither be it, nor lie inside it, nor contain it."""
        if dtype not in S.DTYPES:
            raise ConvertError(f"unsupported dtype {dtype!r}; choose one of {sorted(S.DTYPES)}")
        config.validate()
        self.dst = Path(dst)
        self.src = None if src is None else Path(src)
        self.force = force
        check_destination(self.dst, self.src, force)
        self.config, self.dtype_name, self.dtype = config, dtype, S.DTYPES[dtype]
        self.source = source
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        self.old = self.dst.parent / f".{self.dst.name}.old-{os.getpid()}"
        self.regions = S.plan_regions(config, dtype)
        self.layers: list[dict[str, Any] | None] = [None] * config.n_layers
        self.bundle_crcs: list[np.ndarray | None] = [None] * config.n_layers   # per layer, bundles.crc32
        self.extra: dict[str, Any] = {}
        self._ffn = None

    # -- context management: anything but a clean exit removes the temporary folder ---------------
    def __enter__(self) -> "StoreWriter":
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.dst.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        self._ffn = open(self.tmp / S.FFN, "wb")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._ffn is not None and not self._ffn.closed:
            self._ffn.close()
        if exc_type is None:
            self._finish()
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # -- contents -------------------------------------------------------------------------------------
    def write_resident(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        want = S.expected_resident(self.config)
        missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or extra:
            raise ConvertError(f"resident tensors do not match the config: missing {missing[:5]}, extra {extra[:5]}")
        out = {}
        for name, shape in want.items():
            t = tensors[name]
            if tuple(t.shape) != shape:
                raise ConvertError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            out[name] = t.detach().to(self.dtype).contiguous()
        save_file(out, str(self.tmp / S.RESIDENT), metadata={"format": S.FORMAT})

    def write_layer(self, i: int, up: torch.Tensor, down: torch.Tensor, gate: torch.Tensor | None = None) -> None:
        """Layer i's FFN in HF layout: gate/up (n, dim), down (dim, n). In order. (An fc1 bias
        goes to write_resident as layers.{i}.ffn.up_bias.)"""
        if i != sum(x is not None for x in self.layers):
            raise ConvertError(f"layers must be written in order (got {i})")
        c, n = self.config, self.config.ffn_dims[i]
        parts = {"gate": gate, "up": up, "down": None if down is None else down.t()}
        cols = []
        for name, k in c.bundle_fields:
            t = parts[name]
            if t is None:
                raise ConvertError(f"layer {i}: missing FFN tensor {name!r}")
            t = t.detach()
            if tuple(t.shape) != (n, k):
                raise ConvertError(f"layer {i}: FFN {name} has shape {tuple(t.shape)}, expected {(n, k)}")
            cols.append(t.to(self.dtype))
        bundles = torch.cat(cols, dim=1).contiguous()                    # (n, bundle_values)
        payload = bundles.view(torch.uint8).numpy().tobytes()
        offset, bb, region = self.regions[i]
        assert len(payload) == n * bb and self._ffn is not None
        if self._ffn.tell() != offset:
            raise ConvertError(f"layer {i}: internal offset mismatch {self._ffn.tell()} != {offset}")
        self._ffn.write(payload)
        self._ffn.write(b"\0" * (region - len(payload)))
        self.record_layer(i, payload)

    def record_layer(self, i: int, payload: Any) -> None:
        """Layer i's manifest entry and per-bundle CRC-32s, from its payload as written to ffn.bin
        (any bytes-like object of n_neurons * bundle_bytes bytes)."""
        offset, bb, region = self.regions[i]
        n = self.config.ffn_dims[i]
        mv = memoryview(payload).cast("B")
        if len(mv) != n * bb:
            raise ConvertError(f"layer {i}: payload is {len(mv)} bytes, expected {n * bb}")
        self.bundle_crcs[i] = S.crc32_per_bundle(mv, bb)
        self.layers[i] = S.LayerRegion(i, offset, n, bb, region, tuple(self.config.bundle_fields),
                                       zlib.crc32(mv), None).to_dict()

    def write_tokenizer(self, tokenizer_json: str | bytes, chat_template: str | None = None) -> None:
        data = tokenizer_json.encode() if isinstance(tokenizer_json, str) else tokenizer_json
        (self.tmp / S.TOKENIZER).write_bytes(data)
        if chat_template:
            self.extra["chat_template"] = chat_template

    def _finish(self) -> None:
        missing = [i for i, L in enumerate(self.layers) if L is None]
        if missing:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConvertError(f"conversion incomplete: FFN layers {missing[:5]} not written")
        if not (self.tmp / S.RESIDENT).exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise ConvertError("conversion incomplete: resident weights not written")
        ffn_bytes = (self.tmp / S.FFN).stat().st_size
        manifest = {
            "format": S.FORMAT, "version": S.VERSION, "dtype": self.dtype_name, "source": self.source,
            "config": self.config.to_dict(), "ffn_bytes": ffn_bytes, "alignment": S.ALIGN,
            "layers": self.layers, "chat_template": self.extra.get("chat_template"),
        }
        (self.tmp / S.MANIFEST).write_text(json.dumps(manifest, indent=1))
        np.concatenate(self.bundle_crcs).astype("<u4").tofile(self.tmp / S.BUNDLE_CRCS)
        for name in os.listdir(self.tmp):                                 # durable before visible
            with open(self.tmp / name, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(self.tmp)
        try:
            kind = check_destination(self.dst, self.src, self.force)      # again: it may have changed
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if kind == "store":
            self._swap_in()
        else:                                    # absent, or an empty folder: rename(2) replaces it
            try:
                os.replace(self.tmp, self.dst)
            except BaseException:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
        _fsync_dir(self.dst.parent)

    def _swap_in(self) -> None:
        """Replace the old store at dst: aside, new in, old deleted. The old one is lost only
        once the new one is in place; a failure before that puts it back."""
        if os.path.lexists(self.old):                 # our own leftover (same pid, earlier run)
            shutil.rmtree(self.old)
        try:
            os.rename(self.dst, self.old)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        try:
            os.rename(self.tmp, self.dst)
        except BaseException:
            try:
                os.rename(self.old, self.dst)
            except OSError as e:
                raise ConvertError(f"could not put the old store back ({e}); it is kept at {self.old}",
                                   self.dst) from None
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        shutil.rmtree(self.old, ignore_errors=True)


# -- the destination --------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
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
