"""The llmflash store format: a folder that holds one converted model.

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

File checksums (version 4, store/checksums.py): the manifest's `files` records size and CRC-32
of resident.safetensors, bundles.crc32, tokenizer.json and predictors.safetensors, and
`manifest_crc32` the manifest's own; ffn.bin is covered by its regions' and bundles' CRCs.

Quantized stores (version 6; dtype "q8_0", "q4_0" or "q4_1", GGML's block formats, see
llmflash.models.quant). A bundle is, little-endian:
    gate  dim/32 blocks       row j of gate_proj, quantized along the model dimension (SwiGLU only)
    up    dim/32 blocks       row j of up_proj / fc1
    down  dim raw integers    column j of down_proj / fc2, without scales: int8 (q8_0, dim bytes)
                              or nibbles (q4_0, q4_1: dim/2 bytes; in each 32-row chunk byte k
                              holds row k low and row k + 16 high, GGML's order)
    group uint32              the neuron's original id // 32
so bundle_bytes = fields_before_down * dim/32 * block_bytes + down bytes + 4 (SmolLM2 q4_1:
2 * 360 + 288 + 4 = 1,012 B), no longer a multiple of 4 KiB; the region layout, padding, region
CRC and bundles.crc32 are as above. down_proj (dim, n) is quantized along its rows, in blocks of
32 neurons (the last block of a layer whose n is not a multiple of 32 padded with zeros), as a
GGUF file holds it: a GGUF's own blocks are kept, never rounded a second time. A block's scale
(and q4_1's minimum) is shared by its 32 neurons, so it lives in resident.safetensors as
`layers.{i}.ffn.down_scale` (and `layers.{i}.ffn.down_min`, q4_1), float16 (groups, dim) with
groups = ceil(n / 32): row r of a neuron in group g has value d[g, r] * q (q8_0),
d[g, r] * (q - 8) (q4_0) or d[g, r] * q + m[g, r] (q4_1). The group travels in the bundle, so
reordering bundles keeps every neuron's scales. resident.safetensors holds every other 2-D matrix
(embeddings, learned positions, OPT's project_in/out, attention projections, LM head) as a U8
tensor (rows, cols/32 * block_bytes) under its usual name, quantized along its rows (every
matrix's input width and `dim` must be multiples of 32); norms and biases (1-D) are float32.
The manifest's `quantized` maps each such name to its logical [rows, cols], checked against the
U8 tensor's shape (store/manifest.py), or [rows, cols, kind] when that matrix's blocks are
another of the three formats (a GGUF source's own, kept without a second rounding). Float
stores stay version 4, so readers of version 4 still open them. Version 5 was the first
quantized layout (down columns quantized a second time, along the model dimension: 5% worse
perplexity on SmolLM2's Q4_1 GGUF); it is refused with a message to convert again.

Versions: 4 is the float layout, 6 the quantized one (otherwise the same, checksums included).
Version 3 is the same as 4 without the file and manifest checksums (it opens, without those
checks; `llmflash verify` says what it could not check; a manifest of any
version that carries a `manifest_crc32` is checked against it). Version 2 is version 3 without
bundles.crc32 (it opens; flash then checks nothing per bundle: `llmflash verify` checks the
regions). Version 1 kept the fc1 bias as the bundle's last value; for models
without an FFN bias (Llama, OpenELM: everything but OPT) the two are identical, so version-1
stores of those open as they are; a version-1 store with an FFN bias must be converted again.

The manifest is validated as hostile input (store/manifest.py); resident tensors must be finite
(NaN or Inf weights are refused at load), whatever the version.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..models.config import ModelConfig
from ..models.quant import BLOCK_BYTES
from ..models.quant import bundle_bytes as q_bundle_bytes
from ..models.quant import groups as q_groups

FORMAT = "llmflash-store"
VERSION = 4
VQ = 6  # quantized stores (dtype in QUANT_DTYPES)
VQ5 = 5  # the first quantized layout: refused (convert again; see above)
V3 = 3  # no file or manifest checksums (read as is, unchecked)
V2 = 2  # no bundles.crc32 (read as is)
V1 = 1  # read when the config has no FFN bias (same layout; see above)
ALIGN = 4096
MANIFEST = "manifest.json"
RESIDENT = "resident.safetensors"
FFN = "ffn.bin"
TOKENIZER = "tokenizer.json"
PREDICTORS = "predictors.safetensors"
BUNDLE_CRCS = "bundles.crc32"
KNOWN_FILES = frozenset({MANIFEST, RESIDENT, FFN, TOKENIZER, PREDICTORS, BUNDLE_CRCS})
CHECKSUMMED = (RESIDENT, BUNDLE_CRCS, TOKENIZER, PREDICTORS)  # version 4: manifest["files"] entries
MAX_MANIFEST_BYTES = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
QUANT_DTYPES = dict(BLOCK_BYTES)  # quantized store dtypes -> bytes per 32-value block
STORE_DTYPES = (*DTYPES, *QUANT_DTYPES)  # every dtype a store may have
SAFETENSORS_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}  # safetensors' header names


def crc32_per_bundle(data: Any, bundle_bytes: int) -> np.ndarray:
    """(k,) uint32: zlib's CRC-32 of each `bundle_bytes` bytes of `data` (bytes-like, k bundles
    back to back): what bundles.crc32 records and what is checked against it."""
    mv = memoryview(data).cast("B")
    k = len(mv) // bundle_bytes
    return np.fromiter(
        (zlib.crc32(mv[j * bundle_bytes : (j + 1) * bundle_bytes]) for j in range(k)), dtype=np.uint32, count=k
    )


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
    order: tuple[int, ...] | None  # store position -> original neuron id; None = identity

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


def bundle_bytes_for(config: ModelConfig, dtype: str) -> int:
    """One bundle's bytes in a store of `dtype` (float or quantized: see above)."""
    if dtype in QUANT_DTYPES:
        return q_bundle_bytes(dtype, config.dim, bool(config.gated))
    return config.bundle_values * ITEMSIZE[dtype]


def down_scale_shapes(config: ModelConfig, dtype: str) -> dict[str, tuple[int, int]]:
    """A quantized store's per-layer down scales (and q4_1's minimums): name -> (groups, dim)."""
    out = {}
    for i, n in enumerate(config.ffn_dims):
        out[f"layers.{i}.ffn.down_scale"] = (q_groups(n), config.dim)
        if dtype == "q4_1":
            out[f"layers.{i}.ffn.down_min"] = (q_groups(n), config.dim)
    return out


def quantized_names(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """The resident tensors a quantized store holds quantized: every 2-D one, by logical shape,
    but a mixture of experts' router and shared-expert gate (small, and a top-k choice turns
    rounding into other experts: float32 like the norms)."""
    keep = ("ffn.router.weight", "ffn.shared_gate.weight")
    return {k: (v[0], v[1]) for k, v in expected_resident(config).items() if len(v) == 2 and not k.endswith(keep)}


def plan_regions(config: ModelConfig, dtype: str) -> list[tuple[int, int, int]]:
    """(offset, bundle_bytes, region_bytes) per layer for a new store, regions back to back."""
    bundle_bytes = bundle_bytes_for(config, dtype)
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
            want[p + "attn.q_norm.weight"] = (q if c.qk_norm_all else c.head_dim,)
            want[p + "attn.k_norm.weight"] = (kv if c.qk_norm_all else c.head_dim,)
        if c.n_experts:
            want[p + "ffn.router.weight"] = (c.n_experts, d)
        if c.shared_expert_dim:
            sd = c.shared_expert_dim
            want[p + "ffn.shared.gate.weight"] = want[p + "ffn.shared.up.weight"] = (sd, d)
            want[p + "ffn.shared.down.weight"] = (d, sd)
        if c.shared_expert_gate:
            want[p + "ffn.shared_gate.weight"] = (1, d)
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


def split_bundles(bundles: torch.Tensor, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Views of a (n, bundle_values) bundle matrix as gate (gated models), up and down, (n, dim)
    each. (OPT's fc1 bias is resident: Store.up_biases.)"""
    out, col = {}, 0
    for name, k in config.bundle_fields:
        out[name] = bundles[:, col : col + k]
        col += k
    return out
