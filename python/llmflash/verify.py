"""`llmflash verify STORE`: check a whole store end to end.

Opening a store validates the manifest and the files' sizes and offsets (store.Store); the
strategies then check what they read from ffn.bin (dense and naive a region's CRC-32 when they
read it whole, flash each bundle's as it lands: version-3 stores). A store copied between
machines, or kept on a disk one has reason to doubt, is checked here once, all of it: every layer
region against its CRC-32 and every bundle against bundles.crc32 (which finds a corrupt table
too), every resident tensor's name, shape and dtype, the tokenizer, and the predictors file when
there is one. The first problem is a StoreError naming the file."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .errors import StoreError
from .store import BUNDLE_CRCS, PREDICTORS, Store, crc32_per_bundle


@dataclass(frozen=True)
class VerifyReport:
    path: str
    layers: int
    ffn_bytes: int            # bytes of ffn.bin checked against the layers' CRC-32s
    bundles: int              # bundles checked against bundles.crc32 (0 before version 3)
    resident_tensors: int
    tokenizer: bool           # the store has a tokenizer and it loads
    predictors: bool          # the store has a predictors file and it validates


def verify_store(path: str | os.PathLike[str], progress: bool = True) -> VerifyReport:
    """Check every byte of the store that a model reads; StoreError at the first problem."""
    store = Store(path)
    checked = bundles = 0
    for i in tqdm(range(len(store.layers)), desc="verify ffn.bin", unit="layer", disable=not progress):
        L = store.layers[i]
        rows = store.read_layer(i, verify=True)             # StoreError on a CRC-32 mismatch
        checked += L.payload_bytes
        crcs = store.bundle_crcs(i)
        if crcs is not None:
            got = crc32_per_bundle(rows.contiguous().view(-1).view(torch.uint8).numpy(), L.bundle_bytes)
            bad = np.flatnonzero(got != crcs)
            if len(bad):
                raise StoreError(f"layer {i}'s bundle {int(bad[0])} does not match its CRC-32 here (the region's "
                                 "CRC-32 does match ffn.bin): the table is corrupt", store.path / BUNDLE_CRCS)
            bundles += L.n_neurons
    resident = len(store.resident())                        # names, shapes, dtypes
    tokenizer = store.tokenizer() is not None
    predictors = (store.path / PREDICTORS).is_file()
    if predictors:
        from .predictor_file import read_predictors

        read_predictors(store.path / PREDICTORS, store.config)
    return VerifyReport(str(store.path), len(store.layers), checked, bundles, resident, tokenizer, predictors)
