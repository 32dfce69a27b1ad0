"""The llmflash store: a folder that holds one converted model.

    manifest.json           format/version, ModelConfig, dtype, per-layer FFN regions (below)
    resident.safetensors    what stays in DRAM: embeddings, attention, norms, LM head, OPT's
                            fc1/fc2 biases (canonical names: llmflash.models.config), every
                            tensor in the store dtype (norms and biases too: the writer casts all)
    ffn.bin                 per layer, its neurons as row-column bundles
    tokenizer.json          the tokenizer (`tokenizers` format), when the source had one
    predictors.safetensors  per-layer sparsity predictors, once calibrated
    bundles.crc32           one CRC-32 per bundle (version 3): what flash's single-bundle reads check

ffn.bin: layer i's region starts at `layers[i].offset` (a multiple of ALIGN = 4096, so direct
I/O can address it) and holds `n_neurons` bundles back to back, `bundle_bytes` each, padded
with zeros to `region_bytes` (a multiple of ALIGN). Bundle j is neuron `order[j]` (identity
when `order` is null) and holds, in the store dtype, little-endian:
    gate  (dim values)   row j of gate_proj.weight     (SwiGLU models only)
    up    (dim values)   row j of up_proj / fc1.weight
    down  (dim values)   column j of down_proj / fc2.weight
so one contiguous read brings everything neuron j contributes. `crc32` (zlib's CRC-32) covers
the `n_neurons * bundle_bytes` payload bytes of the region (checked where a region is read
whole). bundles.crc32 holds, little-endian uint32, the CRC-32 of every bundle (its bundle_bytes
bytes), layer after layer in store order: sum(n_neurons) entries, checked by the neuron caches
as each bundle lands (flash reads single bundles, which the region's CRC cannot check).

OPT's fc1 bias (one value per neuron) is not in the bundle: it is the resident tensor
`layers.{i}.ffn.up_bias` (n_i,), in store order like the bundles (entry j is neuron order[j]'s),
so a bundle is 2 * dim values: whole 4 KiB pages at OPT's widths (OPT-6.7B float16: 16,384 B,
4 pages; with the 2-byte bias inside, a 16,386 B bundle spanned 5 pages for direct I/O).

File checksums (version 4, llmflash.checksums): the manifest's `files` records size and CRC-32
of resident.safetensors, bundles.crc32, tokenizer.json and predictors.safetensors, and
`manifest_crc32` the manifest's own; ffn.bin is covered by its regions' and bundles' CRCs.

Versions: 4 is this layout. Version 3 is the same without the file and manifest checksums (it
opens, without those checks; `llmflash verify` says what it could not check; a manifest of any
version that carries a `manifest_crc32` is checked against it). Version 2 is version 3 without
bundles.crc32 (it opens; flash then checks nothing per bundle: `llmflash verify` checks the
regions). Version 1 kept the fc1 bias as the bundle's last value; for models
without an FFN bias (Llama, OpenELM: everything but OPT) the two are identical, so version-1
stores of those open as they are; a version-1 store with an FFN bias must be converted again.

Every manifest is treated as hostile: sizes are capped, types are checked before use (a list
where a string belongs, 1e400 where an integer belongs), duplicate keys are refused, arithmetic is
checked against the real file sizes, and every problem is a StoreError naming the file and the
field. Resident tensors must be finite (NaN or Inf weights are refused at load, checked at memory
speed with torch.aminmax), whatever the version.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checksums import (check_finite, compare_file, manifest_crc32, os_reason, parse_manifest, read_records,
                        replace_file)
from .checksums import manifest_int as _int
from .errors import StoreError
from .models.config import ModelConfig

FORMAT = "llmflash-store"
VERSION = 4
V3 = 3            # no file or manifest checksums (read as is, unchecked)
V2 = 2            # no bundles.crc32 (read as is)
V1 = 1            # read when the config has no FFN bias (same layout; see above)
ALIGN = 4096
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FFN = "ffn.bin"
TOKENIZER = "tokenizer.json"
PREDICTORS = "predictors.safetensors"
BUNDLE_CRCS = "bundles.crc32"
KNOWN_FILES = frozenset({MANIFEST, RESIDENT, FFN, TOKENIZER, PREDICTORS, BUNDLE_CRCS})
CHECKSUMMED = (RESIDENT, BUNDLE_CRCS, TOKENIZER, PREDICTORS)   # version 4: manifest["files"] entries
MAX_MANIFEST_BYTES = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}   # safetensors' header names


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def write_manifest(folder: Path, m: dict[str, Any]) -> None:
    """Write `m` as folder/manifest.json atomically (replace_file), with `manifest_crc32` set to
    its checksum when it is a version-4 manifest (any other key of that name is dropped). The
    checksum is taken over the JSON as it will be read back (tuples as lists, keys as strings)."""
    m = json.loads(json.dumps({k: v for k, v in m.items() if k != "manifest_crc32"}))
    if m.get("version") == VERSION:
        m["manifest_crc32"] = manifest_crc32(m)
    text = json.dumps(m, indent=1)
    replace_file(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text, encoding="ascii"))


def crc32_per_bundle(data: Any, bundle_bytes: int) -> np.ndarray:
    """(k,) uint32: zlib's CRC-32 of each `bundle_bytes` bytes of `data` (bytes-like, k bundles
    back to back): what bundles.crc32 records and what is checked against it."""
    mv = memoryview(data).cast("B")
    k = len(mv) // bundle_bytes
    return np.fromiter((zlib.crc32(mv[j * bundle_bytes:(j + 1) * bundle_bytes]) for j in range(k)),
                       dtype=np.uint32, count=k)


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class LayerRegion:
    """Where layer i's bundles live in ffn.bin."""

    index: int
    offset: int
    n_neurons: int
    bundle_bytes: int
    region_bytes: int
    fields: tuple[tuple[str, int], ...]
    crc32: int
    order: tuple[int, ...] | None   # store position -> original neuron id; None = identity

    @property
    def payload_bytes(self) -> int:
        return self.n_neurons * self.bundle_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "n_neurons": self.n_neurons,
            "bundle_bytes": self.bundle_bytes,
            "region_bytes": self.region_bytes,
            "fields": [list(f) for f in self.fields],
            "crc32": self.crc32,
            "order": list(self.order) if self.order is not None else None,
        }


def plan_regions(config: ModelConfig, dtype: str) -> list[tuple[int, int, int]]:
    """(offset, bundle_bytes, region_bytes) per layer for a new store, regions back to back."""
    bundle_bytes = config.bundle_values * ITEMSIZE[dtype]
    out, offset = [], 0
    for n in config.ffn_dims:
        region = align_up(n * bundle_bytes)
        out.append((offset, bundle_bytes, region))
        offset += region
    return out


def expected_resident(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical resident tensor names and shapes for a config (see models/config.py)."""
    c, d, e = config, config.dim, config.embed_dim
    want: dict[str, tuple[int, ...]] = {"embed.weight": (c.vocab_size, e)}
    if c.learned_pos:
        want["pos_embed.weight"] = (c.max_positions + c.pos_offset, d)
    if e != d:
        want["project_in.weight"] = (d, e)
        want["project_out.weight"] = (e, d)
    norm_names = ["attn_norm", "ffn_norm"]
    for i in range(c.n_layers):
        q, kv = c.n_heads[i] * c.head_dim, c.n_kv_heads[i] * c.head_dim
        p = f"layers.{i}."
        for n in norm_names:
            want[p + n + ".weight"] = (d,)
            if c.norm == "layer":
                want[p + n + ".bias"] = (d,)
        for n, rows, cols in (("q", q, d), ("k", kv, d), ("v", kv, d), ("o", d, q)):
            want[p + f"attn.{n}.weight"] = (rows, cols)
            if c.attn_bias:
                want[p + f"attn.{n}.bias"] = (rows,)
        if c.qk_norm:
            want[p + "attn.q_norm.weight"] = (c.head_dim,)
            want[p + "attn.k_norm.weight"] = (c.head_dim,)
        if c.ffn_bias:
            want[p + "ffn.up_bias"] = (c.ffn_dims[i],)
            want[p + "ffn.down_bias"] = (d,)
    if c.final_norm:
        want["norm.weight"] = (d,)
        if c.norm == "layer":
            want["norm.bias"] = (d,)
    if not c.tie_embeddings:
        want["lm_head.weight"] = (c.vocab_size, e)
    return want


_REDO = {PREDICTORS: ("run `llmflash calibrate` again", "calibration")}   # remedy and writer, if not convert


class Store:
    """An opened, validated store. Cheap to open: nothing large is read until asked for."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        from .leftovers import recover; recover(self.path)   # clean up after interrupted conversions
        if not self.path.exists():
            raise StoreError("no such store folder", self.path)
        if not self.path.is_dir():
            raise StoreError("a store is a folder (made by `llmflash convert`), this is a file", self.path)
        mpath = self.path / MANIFEST
        for name in (MANIFEST, RESIDENT, FFN):
            if not (self.path / name).is_file():
                raise StoreError(f"missing {name}: not a complete llmflash store", self.path / name)
        for name in sorted(os.listdir(self.path)):
            if name not in KNOWN_FILES and not name.startswith("."):
                raise StoreError("unexpected file in the store (a store holds only "
                                 f"{', '.join(sorted(KNOWN_FILES))})", self.path / name)
        size = mpath.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise StoreError(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} cap", mpath)
        try:
            data = mpath.read_bytes()
        except OSError as e:
            raise StoreError(f"cannot read the manifest: {os_reason(e)}", mpath) from None
        m = parse_manifest(data, mpath)
        self.manifest: dict[str, Any] = m
        self._checked: set[str] = set()          # files whose checksum matched (once per Store)
        try:
            self._validate(m, mpath)
        except RecursionError:                   # a deep value that parsed, met again by repr() or ==
            raise StoreError("manifest holds a value nested too deeply", mpath) from None

    # -- validation ------------------------------------------------------------------------
    def _validate(self, m: dict[str, Any], mpath: Path) -> None:
        if m.get("format") != FORMAT:
            raise StoreError(f"format is {m.get('format')!r:.40}, expected {FORMAT!r}", mpath)
        version = m.get("version")
        if version not in (V1, V2, V3, VERSION) or isinstance(version, bool):
            raise StoreError(
                f"unknown format version {version!r:.20} (this llmflash reads versions {V1} to {VERSION}); "
                "re-run `llmflash convert` or upgrade llmflash", mpath)
        if "manifest_crc32" in m or version == VERSION:
            want_crc = _int(m.get("manifest_crc32"), "manifest_crc32", mpath, 0, 0xFFFFFFFF)
            if manifest_crc32(m) != want_crc:
                raise StoreError("the manifest does not match its manifest_crc32: corrupt, or edited after "
                                 "conversion", mpath)
        dtype = m.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise StoreError(f"dtype {dtype!r:.40} is not one of {sorted(DTYPES)}", mpath)
        template = m.get("chat_template")
        if template is not None:
            if not isinstance(template, str):
                raise StoreError(f"chat_template is a {type(template).__name__}, not a string", mpath)
            try:
                template.encode("utf-8")
            except UnicodeEncodeError as e:
                raise StoreError(f"chat_template is not valid UTF-8 text ({e.reason} at character {e.start})",
                                 mpath) from None
        self.dtype_name: str = dtype
        self.dtype: torch.dtype = DTYPES[dtype]
        try:
            cfg = m.get("config")
            if not isinstance(cfg, dict):
                raise ValueError("missing config object")
            self.config = ModelConfig.from_dict(cfg)
            self.config.validate()
        except (TypeError, ValueError) as e:
            raise StoreError(f"bad config: {e}", mpath) from None
        if version == V1 and self.config.ffn_bias:
            raise StoreError(
                f"format version {V1} store of a model with an FFN bias: the bundle layout changed in "
                f"version {V2} (the fc1 bias moved from ffn.bin's bundles to resident.safetensors); "
                "re-run `llmflash convert` on the source model", mpath)
        ffn_path = self.path / FFN
        ffn_size = ffn_path.stat().st_size
        declared = _int(m.get("ffn_bytes"), "ffn_bytes", mpath)
        if ffn_size != declared:
            raise StoreError(
                f"file is {ffn_size} bytes but the manifest says {declared}: truncated or replaced", ffn_path)
        layers = m.get("layers")
        if not isinstance(layers, list) or len(layers) != self.config.n_layers:
            raise StoreError(f"layers must list {self.config.n_layers} regions", mpath)
        want_fields = tuple((n, k) for n, k in self.config.bundle_fields)
        want_bundle = self.config.bundle_values * ITEMSIZE[dtype]
        regions, end = [], 0
        for i, L in enumerate(layers):
            if not isinstance(L, dict):
                raise StoreError(f"layers[{i}] is not an object", mpath)
            off = _int(L.get("offset"), f"layers[{i}].offset", mpath)
            n = _int(L.get("n_neurons"), f"layers[{i}].n_neurons", mpath, 1, 1 << 24)
            bb = _int(L.get("bundle_bytes"), f"layers[{i}].bundle_bytes", mpath, 1, 1 << 30)
            rb = _int(L.get("region_bytes"), f"layers[{i}].region_bytes", mpath)
            crc = _int(L.get("crc32"), f"layers[{i}].crc32", mpath, 0, 0xFFFFFFFF)
            fields = L.get("fields")
            if (not isinstance(fields, list) or not all(isinstance(f, list) and len(f) == 2 and isinstance(f[0], str)
                                                        and type(f[1]) is int for f in fields)):
                raise StoreError(f"layers[{i}].fields = {fields!r:.60} is not a list of [name, integer] pairs", mpath)
            fields = tuple((a, b) for a, b in fields)
            if n != self.config.ffn_dims[i]:
                raise StoreError(f"layers[{i}].n_neurons = {n} but config.ffn_dims[{i}] = {self.config.ffn_dims[i]}", mpath)
            if fields != want_fields or bb != want_bundle:
                raise StoreError(f"layers[{i}] bundle layout {fields}/{bb} B does not match the config "
                                 f"({want_fields}/{want_bundle} B)", mpath)
            if off % ALIGN or rb % ALIGN:
                raise StoreError(f"layers[{i}] offset {off} / size {rb} not {ALIGN}-byte aligned", mpath)
            if rb < n * bb or rb > n * bb + ALIGN:
                raise StoreError(f"layers[{i}].region_bytes = {rb} does not hold {n} bundles of {bb} B", mpath)
            if off < end:
                raise StoreError(f"layers[{i}] region at {off} overlaps the previous one (ends at {end})", mpath)
            end = off + rb
            if end > ffn_size:
                raise StoreError(f"layers[{i}] region [{off}, {end}) lies outside ffn.bin ({ffn_size} bytes)", mpath)
            order = L.get("order")
            if order is not None:
                # ints only (not bools, not floats: 1.0 == 1 would pass the permutation test)
                if (not isinstance(order, list) or len(order) != n or not all(type(x) is int for x in order)
                        or sorted(order) != list(range(n))):
                    raise StoreError(f"layers[{i}].order is not a permutation of the integers 0..{n - 1}", mpath)
                order = tuple(order)
            regions.append(LayerRegion(i, off, n, bb, rb, fields, crc, order))
        self.layers: list[LayerRegion] = regions
        self.ffn_path = ffn_path
        cpath = self.path / BUNDLE_CRCS
        self.has_bundle_crcs = version >= V3
        if self.has_bundle_crcs:
            want = 4 * sum(L.n_neurons for L in regions)
            if not cpath.is_file():
                raise StoreError(f"missing: a version-{version} store holds one CRC-32 per bundle", cpath)
            if cpath.stat().st_size != want:
                raise StoreError(f"file is {cpath.stat().st_size} bytes, expected {want} (4 per bundle): "
                                 "truncated or replaced", cpath)
        elif cpath.exists():
            raise StoreError(f"unexpected in a version-{version} store (versions {V3} and later have it)", cpath)
        # version 4: the recorded files, each there at its recorded size; a tokenizer only if recorded.
        # Predictors are compared where they are loaded, so an interrupted calibrate (a new file, the
        # old manifest) leaves a store that opens and can be calibrated again.
        self.files: dict[str, dict[str, int]] | None = None
        if version == VERSION:
            self.files = read_records(m.get("files"), self.path, mpath, CHECKSUMMED, required=(RESIDENT, BUNDLE_CRCS),
                                      at_open=(RESIDENT, BUNDLE_CRCS, TOKENIZER))

    # -- checksums ---------------------------------------------------------------------------
    def check_file(self, name: str) -> bool:
        """Hash file `name` (one of CHECKSUMMED) and compare it with the manifest's record, once per
        Store: True when it matches (now or earlier), False when the store's version records no
        checksums (before version 4: nothing checked). StoreError naming the file when it cannot
        be read (with the system's reason: permission denied is not "no such file"), is not
        recorded, or does not match."""
        if self.files is None:
            return False
        if name in self._checked:
            return True
        path = self.path / name
        rec = self.files.get(name)
        hint, when = _REDO.get(name, ("convert the model again", "conversion"))
        if rec is None:
            raise StoreError(f"not recorded in the manifest's files: added after conversion or by an interrupted "
                             f"writer; {hint}", path)
        compare_file(path, rec, when, hint)
        self._checked.add(name)
        return True

    # -- contents --------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        t = self.manifest.get("chat_template")
        return t if isinstance(t, str) else None

    def resident(self) -> dict[str, torch.Tensor]:
        """Load resident.safetensors, checking every canonical name and shape is there."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        rpath = self._open_resident()
        try:
            tensors = load_file(str(rpath))
        except OSError as e:
            raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"cannot read resident weights: {e}", rpath) from None
        want = expected_resident(self.config)
        missing = sorted(set(want) - set(tensors))
        if missing:
            raise StoreError(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}", rpath)
        extra = sorted(set(tensors) - set(want))
        if extra:
            raise StoreError(f"unexpected tensors {extra[:5]}", rpath)
        for name, shape in want.items():
            if tuple(tensors[name].shape) != shape:
                raise StoreError(f"{name} has shape {tuple(tensors[name].shape)}, expected {shape}", rpath)
            if tensors[name].dtype != self.dtype:        # the writer stores every tensor in the store dtype
                raise StoreError(f"{name} is {_dtype_name(tensors[name].dtype)}, expected {self.dtype_name} "
                                 "(the manifest's dtype)", rpath)
            check_finite(name, tensors[name], rpath)
        return tensors

    def _open_resident(self) -> Path:
        """resident.safetensors' path, once it is known to be readable (opened here first, so a
        permission problem is reported as such: safetensors' own error would not say) and to
        match its recorded checksum (version 4, hashed once per Store)."""
        rpath = self.path / RESIDENT
        if not self.check_file(RESIDENT):
            try:
                with open(rpath, "rb"):
                    pass
            except OSError as e:
                raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        return rpath

    def up_biases(self) -> list[torch.Tensor | None]:
        """Per layer, the fc1 bias (n_i,) float32 in store order (entry j is bundle j's neuron,
        order[j]); None per layer when the config has no FFN bias. Reads only these tensors of
        resident.safetensors (memory-mapped), so an FFN strategy can hold them beside the model."""
        if not self.config.ffn_bias:
            return [None] * self.config.n_layers
        from safetensors import SafetensorError, safe_open

        rpath = self._open_resident()
        out: list[torch.Tensor | None] = []
        try:
            with safe_open(str(rpath), framework="pt") as f:
                names = set(f.keys())
                for i, n in enumerate(self.config.ffn_dims):
                    name = f"layers.{i}.ffn.up_bias"
                    if name not in names:
                        raise StoreError(f"missing tensor {name}", rpath)
                    sl = f.get_slice(name)
                    shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                    if shape != (n,):
                        raise StoreError(f"{name} has shape {shape}, expected {(n,)}", rpath)
                    if dt != SAFETENSORS_DTYPES[self.dtype_name]:
                        raise StoreError(f"{name} is {dt}, expected {SAFETENSORS_DTYPES[self.dtype_name]} "
                                         f"({self.dtype_name}, the manifest's dtype)", rpath)
                    out.append(f.get_tensor(name).float())
                    check_finite(name, out[-1], rpath)
        except OSError as e:
            raise StoreError(f"cannot read resident weights: {os_reason(e)}", rpath) from None
        except (SafetensorError, ValueError) as e:
            raise StoreError(f"cannot read resident weights: {e}", rpath) from None
        return out

    def read_layer(self, i: int, verify: bool = True) -> torch.Tensor:
        """Layer i's bundles, (n_neurons, bundle_values) in the store dtype, read whole (buffered)."""
        L = self.layers[i]
        buf = np.empty(L.payload_bytes, dtype=np.uint8)
        with open(self.ffn_path, "rb") as f:
            f.seek(L.offset)
            got = f.readinto(memoryview(buf))
        if got != L.payload_bytes:
            raise StoreError(f"short read of layer {i} at offset {L.offset}: {got} of {L.payload_bytes} bytes",
                             self.ffn_path)
        if verify:
            self.check_region(i, buf)
        t = torch.from_numpy(buf).view(self.dtype)
        return t.view(L.n_neurons, -1)

    def check_region(self, i: int, payload: Any) -> None:
        """StoreError unless `payload` (layer i's payload bytes, read whole) matches the region's CRC-32."""
        L = self.layers[i]
        if zlib.crc32(payload) != L.crc32:
            raise StoreError(f"checksum mismatch in layer {i}'s region at offset {L.offset}: the file is corrupt",
                             self.ffn_path)

    def bundle_crcs(self, i: int) -> np.ndarray | None:
        """Layer i's per-bundle CRC-32s, (n_neurons,) uint32 in store order; None before
        version 3."""
        if not self.has_bundle_crcs:
            return None
        self.check_file(BUNDLE_CRCS)                     # the whole table, on its first read (version 4)
        start = sum(L.n_neurons for L in self.layers[:i])
        n = self.layers[i].n_neurons
        return np.fromfile(self.path / BUNDLE_CRCS, dtype="<u4", count=n, offset=4 * start).astype(np.uint32)

    def read_bundles(self, i: int, positions: np.ndarray) -> torch.Tensor:
        """Layer i's bundles at the given store positions (ascending), (k, bundle_values) in the
        store dtype; each run of neighbouring positions is one read (buffered), each bundle
        checked against its CRC-32 (version 3)."""
        L = self.layers[i]
        pos = np.asarray(positions, dtype=np.int64)
        if len(pos) and (pos[0] < 0 or pos[-1] >= L.n_neurons or bool((np.diff(pos) <= 0).any())):
            raise ValueError(f"bundle positions must be ascending and in [0, {L.n_neurons})")
        bb = L.bundle_bytes
        out = np.empty(len(pos) * bb, dtype=np.uint8)
        starts = np.flatnonzero(np.diff(pos, prepend=-2) != 1)           # first index of each run
        ends = np.append(starts[1:], len(pos))
        fd = os.open(self.ffn_path, os.O_RDONLY)
        try:
            for a, b in zip(starts.tolist(), ends.tolist()):
                want = (b - a) * bb
                got = os.preadv(fd, [memoryview(out)[a * bb:b * bb]], L.offset + int(pos[a]) * bb)
                if got != want:
                    raise StoreError(f"short read of layer {i}'s bundles {int(pos[a])}..{int(pos[b - 1])}: "
                                     f"{got} of {want} bytes", self.ffn_path)
        finally:
            os.close(fd)
        crcs = self.bundle_crcs(i)
        if crcs is not None:
            bad = np.flatnonzero(crc32_per_bundle(out, bb) != crcs[pos])
            if len(bad):
                j = int(pos[bad[0]])
                raise StoreError(f"checksum mismatch in layer {i}'s bundle {j} at offset "
                                 f"{L.offset + j * bb}: the file is corrupt", self.ffn_path)
        return torch.from_numpy(out).view(self.dtype).view(len(pos), -1)

    def tokenizer(self):
        """The store's `tokenizers.Tokenizer`, or None when the source shipped none."""
        tpath = self.path / TOKENIZER
        if not tpath.is_file():
            return None
        from tokenizers import Tokenizer

        self.check_file(TOKENIZER)
        try:
            return Tokenizer.from_file(str(tpath))
        except Exception as e:  # tokenizers raises a bare Exception subclass
            raise StoreError(f"cannot read tokenizer: {e}", tpath) from None


def split_bundles(bundles: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Views of a (n, bundle_values) bundle matrix as gate (gated models), up and down, (n, dim)
    each. (OPT's fc1 bias is resident: Store.up_biases.)"""
    out, col = {}, 0
    for name, k in config.bundle_fields:
        out[name] = bundles[:, col:col + k]
        col += k
    return out
