"""GGUF (llama.cpp) -> llmflash store, for the `llama` architecture (Llama 1/2/3 shapes, SmolLM2,
TinyLlama, Mistral without sliding windows, and Mixtral: `expert_count` experts stacked in
blk.N.ffn_{gate,up,down}_exps (E, F, D) / (E, D, F) in HF layout, the router ffn_gate_inp).

Nothing in the file is trusted before convert/gguf_layout.py has walked its header: every count
against the bytes left, every tensor's type, size, alignment and range against the file and the
other tensors. Every tensor is dequantized by its own type (`gguf.quants.dequantize`: F32, F16,
BF16, Q4_0 ... Q8_0, the K-quants and the IQ types) to float32 and then cast to the store dtype.
A "Q4_1" file is not all Q4_1: llama.cpp keeps norms in F32, the embedding often in Q8_0, and
falls back to other types where a row length is not a multiple of a K-quant's 256-value block.
A NaN or infinity among the dequantized values (bytes that are not what the header says) is an
error naming the tensor, as is a value beyond float16's range when converting to float16.

Quantized stores (--dtype q8_0 / q4_0 / q4_1): FFN gate, up and down matrices that the GGUF
already holds in the store's block format keep their blocks byte for byte, and so do resident matrices
(embeddings, LM head, attention) in any of the three formats (the manifest records such a
tensor's own kind; SmolLM2's Q8_0 embeddings stay Q8_0 in a q4_1 store). No second rounding;
Q/K rows are unpermuted as whole rows. The FFN's down matrix keeps its blocks too: its rows run
along the neurons in blocks of 32, which is how a quantized store holds it (store/layout.py).
Every other tensor is dequantized and quantized once.

Layout facts (checked against transformers' own GGUF loader by tests/test_convert_gguf.py):
  * GGUF lists a tensor's dimensions fastest-first (ne[0] = columns), so a [576, 1536] `ffn_up`
    is HF's (1536, 576) `up_proj.weight`; the bytes are already row-major in HF's [out, in]
    order, only the shape is reversed.
  * llama.cpp's converter permutes the rows of Q and K within each head so that its RoPE can
    rotate adjacent pairs (x0, x1), (x2, x3) ...; HF's (and our) RoPE rotates halves
    (x_i, x_{i+hd/2}). llama.cpp wrote rows as (n_head, 2, hd/2) -> (n_head, hd/2, 2);
    `_unpermute` reads them as (n_head, hd/2, 2) and swaps back. n_head is the query head count
    for Q and the KV head count for K.
"""

from __future__ import annotations

import math
import mmap
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConvertError, LlmflashError, UnsupportedModelError
from ..models.config import MAX_EXPERTS, MAX_FFN, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, ModelConfig
from ..models.quant import BLOCK_BYTES as QUANT_BYTES
from ..models.quant import QTensor
from ..store.checksums import is_finite
from .common import natural_key, parse_dtype, progress, regular_file
from .gguf_layout import check_layout
from .gguf_tokenizer import chat_template as _chat_template
from .gguf_tokenizer import tokenizer_json as _tokenizer_json
from .writer import StoreWriter

SUPPORTED_ARCHS = ("llama",)
_KIND = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}  # GGUF types whose blocks a quantized store keeps


def ffn_block_format(src: Path) -> tuple[str | None, str]:
    """(store kind or None, GGUF type name) of the type holding most of the FFN's bytes (the
    ffn_gate/up/down tensors of every block): what `--dtype auto` keeps. ConvertError naming
    the file when it cannot be read as GGUF; (None, "absent") without FFN tensors (the converter
    then says what is wrong with the file)."""
    reader = _open(src)
    size: dict[str, int] = {}
    for t in reader.tensors:
        if t.name.startswith("blk.") and t.name.endswith((".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight")):
            size[t.tensor_type.name] = size.get(t.tensor_type.name, 0) + int(t.n_bytes)
    if not size:
        return None, "absent"
    name = max(size, key=lambda k: size[k])
    return _KIND.get(name), name


_MAGIC = b"GGUF"

# GGUF names inside a block -> canonical resident names (models/config.py); the FFN goes to ffn.bin.
_ATTN = {"attn_q": "attn.q", "attn_k": "attn.k", "attn_v": "attn.v", "attn_output": "attn.o"}
_NORMS = {"attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
_FFN = ("ffn_gate", "ffn_up", "ffn_down")
_EXPERTS = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # router, stacked experts
FP16_MAX = 65504.0
_BLK = re.compile(r"blk\.(\d+)\.(.+)\.(weight|bias)$")


def _reader_class():
    import gguf

    class Reader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memory map. numpy's memmap subclass runs
        Python-level hooks on every slice, and the reader slices a few times per vocabulary string
        (100k of them for SmolLM2): the plain view halves both parsing and dequantization time.
        The view's base is the memmap, which keeps the mapping alive."""

        def _get(self, *args: Any, **kwargs: Any):
            if isinstance(self.data, np.memmap):
                self.data = self.data.view(np.ndarray)
            return super()._get(*args, **kwargs)

    return Reader


def _open(src: Path):
    """A GGUFReader over src, once its header and every tensor's byte range have been checked
    (convert/gguf_layout.py); any failure to parse is a ConvertError naming the file."""
    try:
        if not regular_file(src):
            raise ConvertError("no such file", src)
        with open(src, "rb") as f:
            magic = f.read(4)
            if magic == _MAGIC:
                size = os.fstat(f.fileno()).st_size
                with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                    ranges = check_layout(buf, size, src)
    except OSError as e:
        raise ConvertError(f"cannot read the file ({e.strerror or e})", src) from None
    if magic != _MAGIC:
        raise ConvertError(f"not a GGUF file (starts with {magic!r}, expected {_MAGIC!r})", src)
    try:
        reader = _reader_class()(src, "r")
        got = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    except Exception as e:  # the reader raises ValueError, struct/numpy errors, IndexError ... on bad headers
        raise ConvertError(f"malformed GGUF file ({type(e).__name__}: {e})", src) from None
    for r in ranges:  # the reader must see the very bytes that were checked
        if got.get(r.name) != (r.start, r.n_bytes):
            raise ConvertError(
                f"malformed GGUF file: tensor {r.name!r} is read at {got.get(r.name)}, "
                f"its header says {(r.start, r.n_bytes)}",
                src,
            )
    return reader


def _field_value(field) -> Any:
    """A metadata field as a Python value (str, int, float, bool or a list of them). Written out
    rather than ReaderField.contents(), which older gguf releases lack. Nested arrays -> None."""
    from gguf import GGUFValueType as VT

    types = field.types
    if not types:
        return None
    if types[0] == VT.ARRAY:
        if len(types) != 2:
            return None
        if types[1] == VT.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if types[0] == VT.STRING else part.tolist()[0]


def _metadata(reader, src: Path) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = _field_value(field)
        except Exception as e:
            raise ConvertError(f"cannot decode metadata {key!r} ({type(e).__name__}: {e})", src) from None
    return meta


def _int(meta: dict[str, Any], key: str, src: Path, default: int | None = None, hi: int = 1 << 24) -> int:
    """A positive integer of at most `hi` (common.py's bounds for counts), checked before any
    per-layer list is built from it."""
    v = meta.get(key, default)
    if v is None:
        raise ConvertError(f"missing metadata {key!r}", src)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= hi:
        raise ConvertError(f"metadata {key!r} = {v!r:.40} is not an integer in [1, {hi}]", src)
    return v


def _float(meta: dict[str, Any], key: str, src: Path, default: float | None = None) -> float:
    v = meta.get(key, default)
    if v is None:
        raise ConvertError(f"missing metadata {key!r}", src)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not float(v) > 0:
        raise ConvertError(f"metadata {key!r} = {v!r:.40} is not a positive number", src)
    return float(v)


def _rope_scaling(meta: dict[str, Any], a: str, src: Path) -> dict[str, Any] | None:
    kind = meta.get(f"{a}.rope.scaling.type")
    factor = meta.get(f"{a}.rope.scaling.factor")
    if kind is None and meta.get(f"{a}.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", meta[f"{a}.rope.scale_linear"]
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConvertError(f"rope scaling {kind!r} without a valid factor ({factor!r:.40})", src)
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    # YaRN and LongRoPE would convert (their parameters are in the metadata) but the model code
    # has no such RoPE: refuse here rather than write a store that cannot be opened.
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: linear)", src)


def _config(meta: dict[str, Any], names: dict[str, Any], src: Path) -> ModelConfig:
    a = "llama"
    n_layers = _int(meta, f"{a}.block_count", src, hi=MAX_LAYERS)
    dim = _int(meta, f"{a}.embedding_length", src, hi=MAX_WIDTH)
    ffn = _int(meta, f"{a}.feed_forward_length", src, hi=MAX_FFN)
    n_heads = _int(meta, f"{a}.attention.head_count", src, hi=MAX_HEADS)
    n_kv = _int(meta, f"{a}.attention.head_count_kv", src, default=n_heads, hi=MAX_HEADS)
    head_dim = _int(meta, f"{a}.attention.key_length", src, default=max(dim // n_heads, 1), hi=MAX_HEADS)
    if _int(meta, f"{a}.attention.value_length", src, default=head_dim, hi=MAX_HEADS) != head_dim:
        raise UnsupportedModelError("value head size differs from key head size", src)
    rot = _int(meta, f"{a}.rope.dimension_count", src, default=head_dim, hi=MAX_HEADS)
    if rot != head_dim:
        raise UnsupportedModelError(f"partial rotary embeddings ({rot} of {head_dim} dims) are not supported", src)
    experts = _int(meta, f"{a}.expert_count", src, default=0, hi=MAX_EXPERTS) if f"{a}.expert_count" in meta else 0
    used = _int(meta, f"{a}.expert_used_count", src, hi=MAX_EXPERTS) if experts else 0
    if experts:  # Mixtral: stacked ffn_{gate,up,down}_exps, each expert feed_forward_length wide
        ffn = _int(meta, f"{a}.expert_feed_forward_length", src, default=ffn, hi=MAX_FFN)
        if experts * ffn > MAX_FFN:
            raise ConvertError(f"{experts} experts of {ffn} neurons exceed the {MAX_FFN} a layer may hold", src)
    if "rope_freqs.weight" in names:
        raise UnsupportedModelError("per-frequency RoPE factors (rope_freqs, Llama 3.1 style) are not supported", src)
    if n_heads % n_kv:
        raise ConvertError(f"head_count {n_heads} is not a multiple of head_count_kv {n_kv}", src)
    if head_dim % 2:
        raise ConvertError(f"head size {head_dim} is odd: RoPE needs an even size", src)
    embd = names.get("token_embd.weight")
    if embd is None:
        raise ConvertError("missing tensor 'token_embd.weight'", src)
    vocab = int(embd.shape[-1]) if len(embd.shape) == 2 else 0
    if vocab > MAX_VOCAB:
        raise ConvertError(f"token_embd.weight has {vocab} rows, more than the {MAX_VOCAB} a vocabulary may have", src)
    tokens = meta.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list) and tokens and len(tokens) > vocab:
        raise ConvertError(f"the tokenizer has {len(tokens)} tokens but token_embd only {vocab} rows", src)
    eos = [
        meta[k]
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
        if isinstance(meta.get(k), int)
    ]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    cfg = ModelConfig(
        arch="llama",
        vocab_size=vocab,
        dim=dim,
        n_layers=n_layers,
        head_dim=head_dim,
        n_heads=[n_heads] * n_layers,
        n_kv_heads=[n_kv] * n_layers,
        ffn_dims=[ffn * max(experts, 1)] * n_layers,
        norm="rms",
        norm_eps=_float(meta, f"{a}.attention.layer_norm_rms_epsilon", src, 1e-5),
        act="silu",
        gated=True,
        max_positions=_int(meta, f"{a}.context_length", src, 2048),
        rope_theta=_float(meta, f"{a}.rope.freq_base", src, 10000.0),
        rope_scaling=_rope_scaling(meta, a, src),
        attn_bias=any(f"blk.0.{n}.bias" in names for n in _ATTN),
        tie_embeddings="output.weight" not in names,
        bos_token_id=bos if isinstance(bos, int) else None,
        eos_token_ids=list(dict.fromkeys(eos)),
        name=str(meta.get("general.name") or src.stem),
        n_experts=experts,
        experts_per_token=used,
        norm_topk_prob=bool(experts),  # llama.cpp's llama MoE graph (Mixtral) normalizes the top k
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ConvertError(f"inconsistent model metadata: {e}", src) from None
    return cfg


def _check_names(names: dict[str, Any], cfg: ModelConfig, src: Path) -> None:
    """Every tensor the model needs is there; nothing we would silently ignore is. Stops at the
    first missing name, so a hostile block count costs no more than the file's tensor table."""
    want = ["token_embd.weight", "output_norm.weight"]
    ffn = _EXPERTS if cfg.n_experts else _FFN
    for i in range(cfg.n_layers):
        want += [f"blk.{i}.{n}.weight" for n in (*_ATTN, *_NORMS, *ffn)]
        for name in want[-(6 + len(ffn)) :] if i else want:
            if name not in names:
                raise ConvertError(f"missing tensor {name!r}", src)
    allowed = set(want) | {"output.weight"}
    if cfg.attn_bias:
        allowed |= {f"blk.{i}.{n}.bias" for i in range(cfg.n_layers) for n in _ATTN}
    extra = sorted(set(names) - allowed, key=natural_key)
    if extra:
        raise UnsupportedModelError(f"unexpected tensors {extra[:4]}: this llama variant is not supported", src)


def _dequant(t, src: Path, max_abs: float = math.inf) -> np.ndarray:
    """Tensor t as float32 in HF layout (GGUF's reversed dimensions). A NaN or infinity (bytes
    that are not what the header says), or a value beyond max_abs (the store dtype's range), is
    a ConvertError naming the tensor."""
    from gguf import quants

    shape = tuple(int(x) for x in reversed([int(d) for d in t.shape]))
    try:
        w = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise UnsupportedModelError(
            f"tensor {t.name!r} has type {t.tensor_type.name}, which the gguf package cannot dequantize", src
        ) from None
    except Exception as e:
        raise ConvertError(f"cannot dequantize tensor {t.name!r} ({t.tensor_type.name}): {e}", src) from None
    if w.size != math.prod(shape):
        raise ConvertError(f"tensor {t.name!r} holds {w.size} values, its shape {shape} needs {math.prod(shape)}", src)
    w = np.ascontiguousarray(w.reshape(shape), dtype=np.float32)
    big = max(-float(w.min()), float(w.max())) if w.size else 0.0  # NaN propagates through min/max
    if not math.isfinite(big):
        bad = int(np.count_nonzero(~np.isfinite(w)))
        raise ConvertError(
            f"tensor {t.name!r} ({t.tensor_type.name}) holds {bad} non-finite values (NaN or "
            "infinity): the file is corrupt",
            src,
        )
    if big > max_abs:
        raise ConvertError(
            f"tensor {t.name!r} holds {big:.3g}, beyond float16's range: convert with dtype bfloat16 or float32", src
        )
    return w if w.flags.writeable else w.copy()  # F32 tensors come back as views of the read-only map


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (see the module docstring). w: (rows, cols) or (rows,)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor(
    names: dict[str, Any], name: str, shape: tuple[int, ...], src: Path, max_abs: float = math.inf
) -> np.ndarray:
    w = _dequant(names[name], src, max_abs)
    if w.shape != shape:
        raise ConvertError(f"tensor {name!r} has shape {w.shape} (HF layout), expected {shape}", src)
    return w


def convert_gguf(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "float16", force: bool = False
) -> Path:
    """Convert a llama-architecture GGUF file into the llmflash store `dst`; returns `dst`.
    `dtype` "auto": the block format of most of its FFN's bytes when a store keeps it
    (ffn_block_format), else float16.

    Raises ConvertError (naming the file) for anything malformed: not a GGUF, truncated, a tensor
    missing or of the wrong shape; UnsupportedModelError for another architecture, a tensor
    type the gguf package cannot dequantize, or a llama variant we do not model."""
    src, dst = Path(src), Path(dst)
    dtype = (ffn_block_format(src)[0] or "float16") if dtype == "auto" else parse_dtype(dtype)
    reader = _open(src)
    meta = _metadata(reader, src)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})", src
        )
    names = {t.name: t for t in reader.tensors}
    if len(names) != len(reader.tensors):
        raise ConvertError("duplicate tensor names", src)
    cfg = _config(meta, names, src)
    _check_names(names, cfg, src)

    tok_json = chat = None
    if "tokenizer.ggml.model" in meta:
        tok_json, chat = _tokenizer_json(meta, src), _chat_template(meta)

    # quantized stores: float32 here for what the writer quantizes; blocks already in a kept format stay blocks
    target = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
    d, hd, n = cfg.dim, cfg.head_dim, cfg.ffn_dims[0]
    hq, hkv = cfg.n_heads[0], cfg.n_kv_heads[0]

    max_abs = FP16_MAX if dtype == "float16" else math.inf

    def get(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return _tensor(names, name, shape, src, max_abs)

    def res(w: np.ndarray) -> torch.Tensor:  # cast at once: only the store dtype stays in memory
        return torch.from_numpy(w).to(target)

    def own(name: str, shape: tuple[int, int], heads: int | None = None, any_kind: bool = False) -> Any:
        """A matrix quantized along its rows: the GGUF's own blocks when they are the store's
        block format (`any_kind`, a resident matrix: any of the store block formats) (no second
        rounding; Q/K rows unpermuted as whole rows), else its values."""
        t = names[name]
        kind = _KIND.get(t.tensor_type.name)
        keep = dtype in _KIND.values() and kind is not None and (kind == dtype or any_kind)
        if keep and tuple(int(x) for x in t.data.shape) == (shape[0], shape[1] // 32 * QUANT_BYTES[kind]):
            data = np.ascontiguousarray(t.data if heads is None else _unpermute(np.asarray(t.data), heads))
            q = QTensor(kind, shape, torch.from_numpy(data.copy()))
            if not is_finite(q.scales()):  # kept as they are: checked here, naming the file's tensor
                raise ConvertError(
                    f"tensor {name!r} holds non-finite block scales (NaN or Inf): the file is corrupt", src
                )
            return q
        w = get(name, shape)
        return w if heads is None else _unpermute(w, heads)

    writer = StoreWriter(dst, cfg, dtype=dtype, source=str(src), force=force, src=src)  # fails fast on a bad dst

    def experts(name: str, E: int, shape: tuple[int, int]) -> Any:
        """A stack of E expert matrices of `shape` joined along the neurons: gate/up (E*F, D),
        down (D, E*F). Blocks of the store's kind are kept (down's run along each expert's
        neurons, so F must be whole blocks), else the values."""
        t, down = names[name], shape[0] == d
        kind = _KIND.get(t.tensor_type.name)
        raw = tuple(int(x) for x in t.data.shape)
        if kind == dtype and shape[1] % 32 == 0 and raw == (E, shape[0], shape[1] // 32 * QUANT_BYTES[kind]):
            data = np.asarray(t.data)
            data = data.transpose(1, 0, 2).reshape(shape[0], -1) if down else data.reshape(E * shape[0], -1)
            q = QTensor(kind, (d, E * shape[1]) if down else (E * shape[0], d), torch.from_numpy(data.copy()))
            if not is_finite(q.scales()):
                raise ConvertError(
                    f"tensor {name!r} holds non-finite block scales (NaN or Inf): the file is corrupt", src
                )
            return q
        w = get(name, (E, *shape))
        return np.ascontiguousarray(w.transpose(1, 0, 2)).reshape(d, -1) if down else w.reshape(-1, d)

    def mat(name: str, shape: tuple[int, int], heads: int | None = None) -> Any:
        w = own(name, shape, heads, any_kind=True)
        return w if isinstance(w, QTensor) else res(w)

    resident: dict[str, Any] = {
        "embed.weight": mat("token_embd.weight", (cfg.vocab_size, d)),
        "norm.weight": res(get("output_norm.weight", (d,))),
    }
    if not cfg.tie_embeddings:
        resident["lm_head.weight"] = mat("output.weight", (cfg.vocab_size, d))
    try:
        with writer as w:
            for i in progress(range(cfg.n_layers), desc=f"convert {src.name}", total=cfg.n_layers):
                b, p = f"blk.{i}.", f"layers.{i}."
                shapes = {
                    "attn_q": (hq * hd, d),
                    "attn_k": (hkv * hd, d),
                    "attn_v": (hkv * hd, d),
                    "attn_output": (d, hq * hd),
                }
                for g, c in _ATTN.items():
                    heads = hq if g == "attn_q" else hkv if g == "attn_k" else None
                    resident[f"{p}{c}.weight"] = mat(f"{b}{g}.weight", shapes[g], heads)
                    bias = None
                    if cfg.attn_bias:  # a missing one of q/k/v/o biases is zero
                        bn = f"{b}{g}.bias"
                        bias = get(bn, shapes[g][:1]) if bn in names else np.zeros(shapes[g][:1], np.float32)
                    if heads is not None and bias is not None:
                        bias = _unpermute(bias, heads)
                    if bias is not None:
                        resident[f"{p}{c}.bias"] = res(bias)
                for g, c in _NORMS.items():
                    resident[f"{p}{c}.weight"] = res(get(f"{b}{g}.weight", (d,)))
                if cfg.n_experts:
                    E = cfg.n_experts
                    F = n // E
                    resident[f"{p}ffn.router.weight"] = res(get(f"{b}ffn_gate_inp.weight", (E, d)))
                    # (E, F, D) stacks: expert e's neurons [e*F, (e+1)*F) (models/config.py)
                    gate, up = (experts(f"{b}ffn_{x}_exps.weight", E, (F, d)) for x in ("gate", "up"))
                    down = experts(f"{b}ffn_down_exps.weight", E, (d, F))
                else:
                    gate, up = own(f"{b}ffn_gate.weight", (n, d)), own(f"{b}ffn_up.weight", (n, d))
                    # down's rows run along the neurons, in blocks of 32 neurons: a quantized store
                    # keeps those blocks as they are (store/layout.py)
                    down = own(f"{b}ffn_down.weight", (d, n))
                as_t = lambda a: a if isinstance(a, QTensor) else torch.from_numpy(a)  # noqa: E731
                w.write_layer(i, up=as_t(up), down=as_t(down), gate=as_t(gate))
            w.write_resident(resident)
            if tok_json is not None:
                w.write_tokenizer(tok_json, chat)
    except LlmflashError:
        raise
    except OSError as e:  # writing the store: disk full, permissions ...
        raise ConvertError(f"I/O error while writing the store ({e})", dst) from None
    return dst
