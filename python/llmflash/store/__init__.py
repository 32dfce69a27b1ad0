"""The llmflash store: the folder one converted model lives in.

layout.py     the format: file names, versions, the bundle layout of ffn.bin, LayerRegion
checksums.py  file and manifest checksums, careful reads, atomic writes (replace_file)
manifest.py   writing manifest.json, and validating it as hostile input
store.py      Store: an opened, validated store, read on demand
leftovers.py  what an interrupted conversion leaves, recovered when a store is opened
"""

from .checksums import file_entry, replace_file
from .layout import (
    ALIGN,
    BUNDLE_CRCS,
    CHECKSUMMED,
    DTYPES,
    FFN,
    FORMAT,
    ITEMSIZE,
    KNOWN_FILES,
    MANIFEST,
    MAX_MANIFEST_BYTES,
    PREDICTORS,
    QUANT_DTYPES,
    RESIDENT,
    SAFETENSORS_DTYPES,
    STORE_DTYPES,
    TOKENIZER,
    V1,
    V2,
    V3,
    VERSION,
    VQ,
    VQ5,
    LayerRegion,
    align_up,
    bundle_bytes_for,
    crc32_per_bundle,
    down_scale_shapes,
    expected_resident,
    plan_regions,
    quantized_names,
    split_bundles,
)
from .manifest import write_manifest
from .store import Store

__all__ = [
    "ALIGN",
    "BUNDLE_CRCS",
    "CHECKSUMMED",
    "DTYPES",
    "FFN",
    "FORMAT",
    "ITEMSIZE",
    "KNOWN_FILES",
    "MANIFEST",
    "MAX_MANIFEST_BYTES",
    "quantized_names",
    "bundle_bytes_for",
    "VQ",
    "VQ5",
    "down_scale_shapes",
    "STORE_DTYPES",
    "QUANT_DTYPES",
    "PREDICTORS",
    "RESIDENT",
    "SAFETENSORS_DTYPES",
    "TOKENIZER",
    "V1",
    "V2",
    "V3",
    "VERSION",
    "LayerRegion",
    "Store",
    "align_up",
    "crc32_per_bundle",
    "expected_resident",
    "file_entry",
    "plan_regions",
    "replace_file",
    "split_bundles",
    "write_manifest",
]
