"""A store's manifest.json: writing it, and reading it as hostile input.

Sizes are capped, types are checked before use (a list where a string belongs, 1e400 where an
integer belongs), duplicate keys are refused, arithmetic is checked against the real file sizes,
and every problem is a StoreError naming the file and the field. store/layout.py describes the
fields; `check_manifest` returns what a Store needs from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import StoreError
from ..models.config import ModelConfig
from .checksums import manifest_crc32, os_reason, parse_manifest, read_records, replace_file
from .checksums import manifest_int as _int
from .layout import (
    ALIGN,
    BUNDLE_CRCS,
    CHECKSUMMED,
    DTYPES,
    FFN,
    FORMAT,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    QUANT_DTYPES,
    RESIDENT,
    TOKENIZER,
    V1,
    V2,
    V3,
    VERSION,
    VQ,
    VQ5,
    LayerRegion,
    bundle_bytes_for,
    quantized_names,
)


def write_manifest(folder: Path, m: dict[str, Any]) -> None:
    """Write `m` as folder/manifest.json atomically (replace_file), with `manifest_crc32` set to
    its checksum when it is a version-4 manifest (any other key of that name is dropped). The
    checksum is taken over the JSON as it will be read back (tuples as lists, keys as strings)."""
    m = json.loads(json.dumps({k: v for k, v in m.items() if k != "manifest_crc32"}))
    if m.get("version") in (VERSION, VQ):
        m["manifest_crc32"] = manifest_crc32(m)
    text = json.dumps(m, indent=1)
    replace_file(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text, encoding="ascii"))


def read_manifest(mpath: Path) -> dict[str, Any]:
    """The manifest's JSON object, read under the size cap (StoreError naming it otherwise)."""
    size = mpath.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise StoreError(f"manifest is {size} bytes, over the {MAX_MANIFEST_BYTES} cap", mpath)
    try:
        data = mpath.read_bytes()
    except OSError as e:
        raise StoreError(f"cannot read the manifest: {os_reason(e)}", mpath) from None
    return parse_manifest(data, mpath)


@dataclass(frozen=True)
class Checked:
    """What a validated manifest says (check_manifest)."""

    version: int
    dtype_name: str
    dtype: torch.dtype
    config: ModelConfig
    layers: list[LayerRegion]
    has_bundle_crcs: bool  # version 3 and later: bundles.crc32
    files: dict[str, dict[str, int]] | None  # version 4: recorded sizes and CRC-32s
    quant: str | None = None  # version 5: the block format ("q8_0", "q4_0", "q4_1")
    quantized: dict[str, tuple[int, int, str]] | None = None  # version 5: quantized resident tensors (rows, cols, kind)


def check_manifest(m: dict[str, Any], folder: Path) -> Checked:
    """Validate the manifest `m` of the store `folder` against the folder's files: StoreError
    naming the file and the field at the first problem."""
    mpath = folder / MANIFEST
    try:
        version, dtype = _check_header(m, mpath)
        config = _check_config(m, mpath, version)
        layers = _check_layers(m, mpath, folder / FFN, config, dtype)
        _check_bundle_crcs(folder / BUNDLE_CRCS, version, layers)
        # version 4: the recorded files, each there at its recorded size; a tokenizer only if
        # recorded. Predictors are compared where they are loaded, so an interrupted calibrate (a
        # new file, the old manifest) leaves a store that opens and can be calibrated again.
        files = None
        quantized = _check_quantized(m, mpath, config, dtype) if version == VQ else None
        if version in (VERSION, VQ):
            files = read_records(
                m.get("files"),
                folder,
                mpath,
                CHECKSUMMED,
                required=(RESIDENT, BUNDLE_CRCS),
                at_open=(RESIDENT, BUNDLE_CRCS, TOKENIZER),
            )
    except RecursionError:  # a deep value that parsed, met again by repr() or ==
        raise StoreError("manifest holds a value nested too deeply", mpath) from None
    quant = dtype if dtype in QUANT_DTYPES else None
    torch_dtype = DTYPES.get(dtype, torch.float32)  # quantized: the compute dtype
    return Checked(version, dtype, torch_dtype, config, layers, version >= V3, files, quant, quantized)


def _check_quantized(
    m: dict[str, Any], mpath: Path, config: ModelConfig, dtype: str
) -> dict[str, tuple[int, int, str]]:
    """The manifest's `quantized` object: exactly the config's resident matrices, each with its
    logical [rows, cols] (cols a multiple of 32) and, when its blocks are not the store's dtype
    (a GGUF source's own kept as they were), their kind third. Returns name -> (rows, cols, kind)."""
    q = m.get("quantized")
    if not isinstance(q, dict):
        raise StoreError(f"quantized is {type(q).__name__}, expected an object of name: [rows, cols]", mpath)
    want = quantized_names(config)
    unknown = sorted(str(k) for k in q if k not in want)
    if unknown:
        raise StoreError(f"quantized names unknown tensors {unknown[:3]!r:.80}", mpath)
    missing = sorted(k for k in want if k not in q)
    if missing:
        raise StoreError(f"quantized lacks {missing[:3]}", mpath)
    out = {}
    for name, shape in want.items():
        v = q[name]
        if (
            not isinstance(v, list)
            or len(v) not in (2, 3)
            or not all(type(x) is int for x in v[:2])
            or (len(v) == 3 and not (isinstance(v[2], str) and v[2] in QUANT_DTYPES))
        ):
            raise StoreError(
                f"quantized[{name!r}] = {v!r:.60} is not [rows, cols] or [rows, cols, kind] "
                f"(kind one of {', '.join(QUANT_DTYPES)})",
                mpath,
            )
        if tuple(v[:2]) != shape:
            raise StoreError(f"quantized[{name!r}] = {v[:2]} but the config says {list(shape)}", mpath)
        if shape[1] % 32:
            raise StoreError(f"quantized[{name!r}] has {shape[1]} columns, not a multiple of 32 ({dtype})", mpath)
        out[name] = (shape[0], shape[1], v[2] if len(v) == 3 else dtype)
    return out


def _check_header(m: dict[str, Any], mpath: Path) -> tuple[int, str]:
    """(version, dtype name) after checking the format, version, manifest_crc32, dtype and
    chat_template fields."""
    if m.get("format") != FORMAT:
        raise StoreError(f"format is {m.get('format')!r:.40}, expected {FORMAT!r}", mpath)
    version = m.get("version")
    if version == VQ5 and not isinstance(version, bool):
        raise StoreError(
            f"format version {VQ5}: a quantized store in llmflash's first quantized layout, which "
            "quantized the FFN's down columns a second time (about 5% worse perplexity); this llmflash "
            f"reads quantized stores of version {VQ}: convert the model again with `llmflash convert`",
            mpath,
        )
    if version not in (V1, V2, V3, VERSION, VQ) or isinstance(version, bool):
        raise StoreError(
            f"unknown format version {version!r:.20} (this llmflash reads versions {V1} to {VERSION} and {VQ}); "
            "re-run `llmflash convert` or upgrade llmflash",
            mpath,
        )
    if "manifest_crc32" in m or version in (VERSION, VQ):
        want_crc = _int(m.get("manifest_crc32"), "manifest_crc32", mpath, 0, 0xFFFFFFFF)
        if manifest_crc32(m) != want_crc:
            raise StoreError(
                "the manifest does not match its manifest_crc32: corrupt, or edited after conversion", mpath
            )
    dtype = m.get("dtype")
    if not isinstance(dtype, str) or (dtype not in DTYPES and dtype not in QUANT_DTYPES):
        raise StoreError(f"dtype {dtype!r:.40} is not one of {sorted(DTYPES) + sorted(QUANT_DTYPES)}", mpath)
    if (version == VQ) != (dtype in QUANT_DTYPES):
        raise StoreError(
            f"dtype {dtype} in a version-{version} manifest: quantized dtypes ({', '.join(QUANT_DTYPES)}) "
            f"are version {VQ}, and only they",
            mpath,
        )
    template = m.get("chat_template")
    if template is not None:
        if not isinstance(template, str):
            raise StoreError(f"chat_template is a {type(template).__name__}, not a string", mpath)
        try:
            template.encode("utf-8")
        except UnicodeEncodeError as e:
            raise StoreError(
                f"chat_template is not valid UTF-8 text ({e.reason} at character {e.start})", mpath
            ) from None
    return version, dtype


def _check_config(m: dict[str, Any], mpath: Path, version: int) -> ModelConfig:
    try:
        cfg = m.get("config")
        if not isinstance(cfg, dict):
            raise ValueError("missing config object")
        config = ModelConfig.from_dict(cfg)
        config.validate()
    except (TypeError, ValueError) as e:
        raise StoreError(f"bad config: {e}", mpath) from None
    if version == V1 and config.ffn_bias:
        raise StoreError(
            f"format version {V1} store of a model with an FFN bias: the bundle layout changed in "
            f"version {V2} (the fc1 bias moved from ffn.bin's bundles to resident.safetensors); "
            "re-run `llmflash convert` on the source model",
            mpath,
        )
    return config


def _check_layers(m: dict[str, Any], mpath: Path, ffn_path: Path, config: ModelConfig, dtype: str) -> list[LayerRegion]:
    """The layers' regions: each well formed, matching the config, aligned, in order without
    overlap, and inside ffn.bin (whose size must be the manifest's ffn_bytes)."""
    ffn_size = ffn_path.stat().st_size
    declared = _int(m.get("ffn_bytes"), "ffn_bytes", mpath)
    if ffn_size != declared:
        raise StoreError(f"file is {ffn_size} bytes but the manifest says {declared}: truncated or replaced", ffn_path)
    layers = m.get("layers")
    if not isinstance(layers, list) or len(layers) != config.n_layers:
        raise StoreError(f"layers must list {config.n_layers} regions", mpath)
    regions: list[LayerRegion] = []
    for i, entry in enumerate(layers):
        end = regions[-1].offset + regions[-1].region_bytes if regions else 0
        regions.append(_check_region(i, entry, mpath, config, dtype, end, ffn_size))
    return regions


def _check_region(i: int, L: Any, mpath: Path, config: ModelConfig, dtype: str, end: int, ffn_size: int) -> LayerRegion:
    """layers[i] as a LayerRegion, its fields checked on their own and against the config, the
    region after the previous one's `end` and inside ffn.bin (`ffn_size` bytes)."""
    if not isinstance(L, dict):
        raise StoreError(f"layers[{i}] is not an object", mpath)
    off = _int(L.get("offset"), f"layers[{i}].offset", mpath)
    n = _int(L.get("n_neurons"), f"layers[{i}].n_neurons", mpath, 1, 1 << 24)
    bb = _int(L.get("bundle_bytes"), f"layers[{i}].bundle_bytes", mpath, 1, 1 << 30)
    rb = _int(L.get("region_bytes"), f"layers[{i}].region_bytes", mpath)
    crc = _int(L.get("crc32"), f"layers[{i}].crc32", mpath, 0, 0xFFFFFFFF)
    fields = L.get("fields")
    if not isinstance(fields, list) or not all(
        isinstance(f, list) and len(f) == 2 and isinstance(f[0], str) and type(f[1]) is int for f in fields
    ):
        raise StoreError(f"layers[{i}].fields = {fields!r:.60} is not a list of [name, integer] pairs", mpath)
    fields = tuple((a, b) for a, b in fields)
    if n != config.ffn_dims[i]:
        raise StoreError(f"layers[{i}].n_neurons = {n} but config.ffn_dims[{i}] = {config.ffn_dims[i]}", mpath)
    want_fields = tuple((name, k) for name, k in config.bundle_fields)
    want_bundle = bundle_bytes_for(config, dtype)
    if fields != want_fields or bb != want_bundle:
        raise StoreError(
            f"layers[{i}] bundle layout {fields}/{bb} B does not match the config ({want_fields}/{want_bundle} B)",
            mpath,
        )
    if off % ALIGN or rb % ALIGN:
        raise StoreError(f"layers[{i}] offset {off} / size {rb} not {ALIGN}-byte aligned", mpath)
    if rb < n * bb or rb > n * bb + ALIGN:
        raise StoreError(f"layers[{i}].region_bytes = {rb} does not hold {n} bundles of {bb} B", mpath)
    if off < end:
        raise StoreError(f"layers[{i}] region at {off} overlaps the previous one (ends at {end})", mpath)
    if off + rb > ffn_size:
        raise StoreError(f"layers[{i}] region [{off}, {off + rb}) lies outside ffn.bin ({ffn_size} bytes)", mpath)
    order = L.get("order")
    if order is not None and config.n_experts:
        raise StoreError(f"layers[{i}].order is set, but a mixture of experts keeps its experts in place", mpath)
    if order is not None:
        # ints only (not bools, not floats: 1.0 == 1 would pass the permutation test)
        if (
            not isinstance(order, list)
            or len(order) != n
            or not all(type(x) is int for x in order)
            or sorted(order) != list(range(n))
        ):
            raise StoreError(f"layers[{i}].order is not a permutation of the integers 0..{n - 1}", mpath)
        order = tuple(order)
    return LayerRegion(i, off, n, bb, rb, fields, crc, order)


def _check_bundle_crcs(cpath: Path, version: int, regions: list[LayerRegion]) -> None:
    """bundles.crc32 is there at 4 bytes per bundle from version 3 on, and absent before."""
    if version >= V3:
        want = 4 * sum(L.n_neurons for L in regions)
        if not cpath.is_file():
            raise StoreError(f"missing: a version-{version} store holds one CRC-32 per bundle", cpath)
        if cpath.stat().st_size != want:
            raise StoreError(
                f"file is {cpath.stat().st_size} bytes, expected {want} (4 per bundle): truncated or replaced", cpath
            )
    elif cpath.exists():
        raise StoreError(f"unexpected in a version-{version} store (versions {V3} and later have it)", cpath)
