"""`llmflash verify STORE`: check a whole store end to end.

Opening a store validates the manifest and the files' sizes and offsets (store.Store), but the
flash strategy reads single bundles, which no checksum covers (each layer region has one CRC-32,
and checking it would mean reading the region whole: what flash exists to avoid). So a store
copied between machines, or kept on a disk one has reason to doubt, is checked here once: every
layer region against its CRC-32, every resident tensor's name, shape and dtype, the tokenizer,
and the predictors file when there is one. The first problem is a StoreError naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tqdm import tqdm

from .store import PREDICTORS, Store


@dataclass(frozen=True)
class VerifyReport:
    path: str
    layers: int
    ffn_bytes: int            # bytes of ffn.bin checked against the layers' CRC-32s
    resident_tensors: int
    tokenizer: bool           # the store has a tokenizer and it loads
    predictors: bool          # the store has a predictors file and it validates


def verify_store(path: str | os.PathLike[str], progress: bool = True) -> VerifyReport:
    """Check every byte of the store that a model reads; StoreError at the first problem."""
    store = Store(path)
    checked = 0
    for i in tqdm(range(len(store.layers)), desc="verify ffn.bin", unit="layer", disable=not progress):
        store.read_layer(i, verify=True)                    # StoreError on a CRC-32 mismatch
        checked += store.layers[i].payload_bytes
    resident = len(store.resident())                        # names, shapes, dtypes
    tokenizer = store.tokenizer() is not None
    predictors = (store.path / PREDICTORS).is_file()
    if predictors:
        from .predictor_file import read_predictors

        read_predictors(store.path / PREDICTORS, store.config)
    return VerifyReport(str(store.path), len(store.layers), checked, resident, tokenizer, predictors)
