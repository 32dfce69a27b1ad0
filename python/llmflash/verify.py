"""`llmflash verify STORE`: check a whole store end to end.

Opening a store validates the manifest (its own checksum, version 4) and the files' sizes and
offsets (store.Store); a model then checks each file where it loads it (resident tensors,
tokenizer, predictors and bundles.crc32 against their recorded CRC-32s, version 4) and what it
reads from ffn.bin (dense and naive a region's CRC-32 when they read it whole, flash each
bundle's as it lands: version 3 and later). A store copied between machines, or kept on a disk
one has reason to doubt, is checked here once, all of it, the small files first: bundles.crc32,
resident.safetensors (checksum; every tensor's name, shape, dtype and finiteness),
tokenizer.json (checksum; it loads; its ids fit the model's vocabulary), the predictors file
whenever there is one or the manifest declares one (checksum, then every tensor), and then every
layer region against its CRC-32 and every bundle against bundles.crc32. The first problem is a
StoreError naming the file. An older store has no recorded checksums for some files: the report
lists what could not be checked (`unchecked`), and the one-line summary says so."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .errors import StoreError
from .sparsity.predictors_file import load_predictors
from .store import BUNDLE_CRCS, MANIFEST, PREDICTORS, RESIDENT, TOKENIZER, VERSION, Store, crc32_per_bundle


@dataclass(frozen=True)
class VerifyReport:
    path: str
    layers: int
    ffn_bytes: int  # bytes of ffn.bin checked against the layers' CRC-32s
    bundles: int  # bundles checked against bundles.crc32 (0 before version 3)
    resident_tensors: int
    tokenizer: bool  # the store has a tokenizer and it loads
    predictors: bool  # the store has a predictors file and it validates
    version: int = VERSION
    unchecked: tuple[str, ...] = ()  # checks this store's version gives no means for

    def summary(self) -> str:
        """One line: what was checked, and what could not be (older format versions)."""
        line = (
            f"{self.path}: ok: {self.layers} layer regions ({self.ffn_bytes / 1e6:.1f} MB) and {self.bundles} "
            f"bundles match their CRC-32s, {self.resident_tensors} resident tensors, tokenizer "
            f"{'ok' if self.tokenizer else 'none'}, predictors {'ok' if self.predictors else 'none'}"
        )
        if self.unchecked:
            line += (
                f"; format version {self.version} records no {', '.join(self.unchecked)}: not checked "
                "(`llmflash convert` again for a version-4 store)"
            )
        return line


def _check_vocab(store: Store, tok) -> None:
    """StoreError naming tokenizer.json when the tokenizer can produce ids the model has no row for."""
    vocab = store.config.vocab_size
    size = tok.get_vocab_size(with_added_tokens=True)
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if size > vocab or top >= vocab:
        raise StoreError(
            f"the tokenizer has {size} tokens (largest id {top}) but the model's vocabulary is "
            f"{vocab} (ids 0..{vocab - 1}): it belongs to another model",
            store.path / TOKENIZER,
        )


def verify_store(path: str | os.PathLike[str], progress: bool = True) -> VerifyReport:
    """Check every byte of the store that a model reads; StoreError at the first problem."""
    store = Store(path)
    version = store.manifest["version"]
    unchecked: list[str] = []
    if store.files is None:
        have = [n for n in (RESIDENT, BUNDLE_CRCS, TOKENIZER, PREDICTORS) if (store.path / n).is_file()]
        sealed = {MANIFEST} if "manifest_crc32" in store.manifest else set()  # then checked at open
        unchecked = [f"{n} checksum" for n in [MANIFEST, *have] if n not in sealed]
        if not store.has_bundle_crcs:
            unchecked.append("per-bundle CRC-32s (bundles.crc32)")
    elif store.has_bundle_crcs:
        store.check_file(BUNDLE_CRCS)  # a corrupt table is blamed on itself
    resident = len(store.resident())  # checksum, names, shapes, dtypes, finite
    tok = store.tokenizer()
    if tok is not None:
        _check_vocab(store, tok)
    ppath = store.path / PREDICTORS
    declared = store.manifest.get("predictors") is not None or PREDICTORS in (store.files or {})
    if declared and not ppath.is_file():
        raise StoreError("missing: the manifest declares predictors (run `llmflash calibrate` again)", ppath)
    predictors = ppath.is_file()
    if predictors:
        load_predictors(store)  # checksum, the manifest's entry, every tensor
    checked = bundles = 0
    for i in tqdm(range(len(store.layers)), desc="verify ffn.bin", unit="layer", disable=not progress):
        L = store.layers[i]
        rows = store.read_layer(i, verify=True)  # StoreError on a CRC-32 mismatch
        checked += L.payload_bytes
        if store.quant:  # each bundle's down group (its last 4 bytes): its neuron's
            store.check_groups(i, rows)
        crcs = store.bundle_crcs(i)
        if crcs is not None:
            got = crc32_per_bundle(rows.contiguous().view(-1).view(torch.uint8).numpy(), L.bundle_bytes)
            bad = np.flatnonzero(got != crcs)
            if len(bad):
                raise StoreError(
                    f"layer {i}'s bundle {int(bad[0])} does not match its CRC-32 here (the region's "
                    "CRC-32 does match ffn.bin): the table is corrupt",
                    store.path / BUNDLE_CRCS,
                )
            bundles += L.n_neurons
    return VerifyReport(
        str(store.path),
        len(store.layers),
        checked,
        bundles,
        resident,
        tok is not None,
        predictors,
        version,
        tuple(unchecked),
    )
