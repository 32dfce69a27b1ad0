"""Rewrite a store with its layers' neurons in a new order, atomically.

What changes: ffn.bin (each region's bundles permuted; offsets, sizes and padding as before),
bundles.crc32 (permuted with them), the manifest (each layer's `order` and region `crc32`, the
files' checksums, a `placement` record) and, for models with an fc1 bias (OPT), the resident
`layers.{i}.ffn.up_bias`, which is kept in store order. Nothing else: the predictors, their
per-neuron rates and the hot sets speak original neuron ids, and a quantized bundle carries its
own down group, so they stay valid as they are (and are hard-linked, or copied, unchanged).

Every region is read whole and checked against its CRC-32 and every bundle against
bundles.crc32 before its permuted copy is written (into the temporary folder), so a corrupt store
is refused (StoreError naming the file), never re-checksummed into a valid-looking one; and the
manifest must still be the one read when placement began (a `calibrate` meanwhile is refused).
A store reached through a symbolic link is placed where the link points. The new store is written into the hidden
sibling `.NAME.tmp-PID`, opened and checked as a Store, and swapped in the way `convert --force`
replaces a store (an atomic exchange where the kernel allows): an interrupted placement leaves
the old store as it was, and only a hidden folder that the next opening of the store removes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..convert.destination import clear_own_leftover, fsync_dir, swap_in
from ..errors import StoreError
from ..store import (
    BUNDLE_CRCS,
    FFN,
    KNOWN_FILES,
    MANIFEST,
    RESIDENT,
    Store,
    crc32_per_bundle,
    file_entry,
    leftovers,
    replace_file,
    write_manifest,
)


def rewrite_store(store: Store, orders: list[torch.Tensor], record: dict[str, Any], progress: bool = True) -> None:
    """Replace the store at store.path with the same store whose layer i holds neuron
    orders[i][p] (an original id) at position p; `record` is kept as the manifest's `placement`."""
    # the real folder: a symbolic link to a store is followed (the link stays a link, the store it
    # names is placed), and `.` or `..` get a name to put the temporary folder beside
    dst = Path(os.path.realpath(store.path))
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    _check_orders(store, orders)
    _check_unchanged(store)
    clear_own_leftover(tmp)
    try:
        tmp.mkdir()
        biases = store.up_biases()
        has_bias = any(b is not None for b in biases)
        for name in sorted(KNOWN_FILES - {FFN, BUNDLE_CRCS, MANIFEST} - ({RESIDENT} if has_bias else set())):
            if (dst / name).is_file():
                _link_or_copy(dst / name, tmp / name)
        moves = [_moves(store, i, o) for i, o in enumerate(orders)]  # new position -> old position
        region_crcs, bundle_crcs = _write_ffn(store, moves, tmp / FFN, progress)
        if store.has_bundle_crcs:
            table = np.concatenate(bundle_crcs).astype("<u4").tobytes()
            replace_file(tmp / BUNDLE_CRCS, lambda t: t.write_bytes(table))
        if has_bias:
            _write_resident(store, moves, tmp / RESIDENT)
        m = dict(store.manifest)
        m["layers"] = [dict(L) for L in m["layers"]]
        for i, o in enumerate(orders):
            m["layers"][i]["order"] = [int(v) for v in o]
            m["layers"][i]["crc32"] = region_crcs[i]
        if isinstance(m.get("files"), dict):
            m["files"] = dict(m["files"])
            for name in (BUNDLE_CRCS, RESIDENT):
                if name in m["files"]:
                    m["files"][name] = file_entry(tmp / name)
        m["placement"] = record
        write_manifest(tmp, m)
        fsync_dir(tmp)
        Store(tmp)  # the new store opens and checks out before it replaces the old one
    except BaseException:
        try:
            leftovers.remove_tree(tmp)
        except OSError:
            pass  # a hidden leftover, removed when the store is next opened
        raise
    swap_in(tmp, dst, old)


def _check_unchanged(store: Store) -> None:
    """StoreError unless the store's manifest is still the one `store` read (recording takes
    minutes: a `calibrate` meanwhile would leave the placed store recording the old predictors)."""
    if Store(store.path).manifest != store.manifest:
        raise StoreError(
            "the store changed while it was being placed (calibrated again?); nothing was changed: run place again",
            store.path / MANIFEST,
        )


def _check_orders(store: Store, orders: list[torch.Tensor]) -> None:
    if len(orders) != len(store.layers):
        raise ValueError(f"{len(orders)} orders for {len(store.layers)} layers")
    for i, (o, L) in enumerate(zip(orders, store.layers)):
        if not torch.equal(torch.sort(torch.as_tensor(o).long()).values, torch.arange(L.n_neurons)):
            raise ValueError(f"layer {i}'s order is not a permutation of 0..{L.n_neurons - 1}")


def _moves(store: Store, i: int, order: torch.Tensor) -> np.ndarray:
    """For each new position p, the current position of neuron order[p]."""
    L = store.layers[i]
    pos = np.arange(L.n_neurons) if L.order is None else np.argsort(np.asarray(L.order))  # id -> position
    return pos[np.asarray(order, dtype=np.int64)]


def _write_ffn(store: Store, moves: list[np.ndarray], path: Path, progress: bool) -> tuple[list[int], list[np.ndarray]]:
    """ffn.bin with every region's bundles permuted (each region and bundle checked first); the
    regions' new CRC-32s and each layer's bundle CRC-32s in the new order (empty without a table)."""
    import zlib

    from tqdm import tqdm

    region_crcs: list[int] = []
    bundle_crcs: list[np.ndarray] = []
    size = store.ffn_path.stat().st_size

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for i in tqdm(range(len(store.layers)), desc="rewrite", unit="layer", disable=not progress):
                L = store.layers[i]
                rows = store.read_layer(i, verify=True).contiguous().view(torch.uint8).numpy()
                rows = rows.reshape(L.n_neurons, L.bundle_bytes)
                have = store.bundle_crcs(i)
                if have is not None:
                    bad = np.flatnonzero(crc32_per_bundle(rows, L.bundle_bytes) != have)
                    if len(bad):
                        raise StoreError(
                            f"layer {i}'s bundle {int(bad[0])} does not match its CRC-32 in {BUNDLE_CRCS}: "
                            "the store is corrupt (run `llmflash verify`); nothing was changed",
                            store.ffn_path,
                        )
                    bundle_crcs.append(have[moves[i]])
                payload = np.ascontiguousarray(rows[moves[i]]).tobytes()
                region_crcs.append(zlib.crc32(payload))
                f.seek(L.offset)
                f.write(payload)
                f.write(bytes(L.region_bytes - len(payload)))
            f.truncate(size)

    replace_file(path, write)
    return region_crcs, bundle_crcs


def _write_resident(store: Store, moves: list[np.ndarray], path: Path) -> None:
    """resident.safetensors with each fc1 bias in the new store order, everything else as it was."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = store.path / RESIDENT
    store.check_file(RESIDENT)
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for i, mv in enumerate(moves):
        name = f"layers.{i}.ffn.up_bias"
        if name in tensors:
            tensors[name] = tensors[name][torch.from_numpy(mv)].contiguous()
    replace_file(path, lambda t: save_file(tensors, str(t), metadata=meta))


def _link_or_copy(src: Path, dst: Path) -> None:
    """dst as a hard link to src (an unchanged file costs nothing), or a copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
