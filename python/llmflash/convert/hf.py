"""Hugging Face folder (config.json + *.safetensors) -> llmflash store.

    convert_hf(Path("SmolLM2-135M"), Path("smol.llmflash"), dtype="float16")

Architectures by config.json's `model_type`: `llama` (and `mistral` without a sliding window,
which is the same network), `opt`, `openelm`. Each has a small plan below: its ModelConfig, every
source tensor it needs with the expected shape, and how they map onto the store's canonical
names (llmflash.models.config). The whole plan is checked against the safetensors headers before
anything is written, so a missing tensor or a wrong shape fails in a second, naming the tensor
and the file. Then tensors are read layer by layer through safe_open (memory-mapped, one tensor
at a time): each layer's FFN goes to ffn.bin at once, so peak memory is the resident weights plus
one layer, whatever the model's size.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConvertError, UnsupportedModelError
from ..models.config import ModelConfig
from ..models.openelm import openelm_dims
from .common import parse_dtype, progress
from .writer import StoreWriter

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
SUPPORTED = ("llama", "mistral", "opt", "openelm")
FP16_MAX = 65504.0


# -- the checkpoint: tensor names -> shard files ---------------------------------------------------
class Checkpoint:
    """The tensors of a folder's safetensors files, opened lazily (headers only at first)."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.folder = folder
        index = folder / INDEX
        self.expected_in: dict[str, Path] = {}              # from the index: name -> shard
        if index.is_file():
            wm = _read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ConvertError("no weight_map object of tensor name -> file name", index)
            files = []
            for shard in dict.fromkeys(wm.values()):
                p = folder / shard
                if os.sep in shard or shard.startswith(".") or not p.is_file():
                    raise ConvertError(f"shard {shard!r} listed in the index is missing", index)
                files.append(p)
            self.expected_in = {k: folder / v for k, v in wm.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
        if not files:
            extra = " (pytorch_model.bin checkpoints are not supported: save with safetensors)" \
                if any(folder.glob("*.bin")) else ""
            raise ConvertError(f"no *.safetensors weights in the folder{extra}", folder)
        self.files = files
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        for p in files:
            try:
                h = safe_open(str(p), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConvertError(f"unreadable safetensors file (truncated or corrupt?): {e}", p) from None
            self.handles[p] = h
            for k in keys:
                if k in self.where:
                    raise ConvertError(f"tensor {k!r} appears in both {self.where[k].name} and {p.name}", p)
                self.where[k] = p

    def _file_for_missing(self, name: str) -> Path:
        if name in self.expected_in:
            return self.expected_in[name]
        return self.files[0] if len(self.files) == 1 else self.folder

    def resolve(self, name: str) -> str | None:
        """The stored name: checkpoints saved from the base model lack the `model.` prefix."""
        for cand in (name, name.removeprefix("model."), "model." + name):
            if cand in self.where:
                return cand
        return None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Fail unless `name` exists with `shape` and a float dtype (reads the header only)."""
        stored = self.resolve(name)
        if stored is None:
            raise ConvertError(f"missing tensor {name!r}", self._file_for_missing(name))
        path = self.where[stored]
        sl = self.handles[path].get_slice(stored)
        got, dt = tuple(sl.get_shape()), sl.get_dtype()
        if got != shape:
            raise ConvertError(f"tensor {stored!r} has shape {got}, expected {shape}", path)
        if dt not in FLOAT_DTYPES:
            raise UnsupportedModelError(f"tensor {stored!r} is {dt}; only float16/bfloat16/float32 "
                                        "weights are supported (quantized checkpoints are not)", path)

    def get(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        assert stored is not None, name                     # the plan was checked first
        path = self.where[stored]
        try:
            return self.handles[path].get_tensor(stored)
        except Exception as e:  # safetensors raises its own error type
            raise ConvertError(f"cannot read tensor {stored!r}: {e}", path) from None

    def path_of(self, name: str) -> Path:
        stored = self.resolve(name)
        return self.where[stored] if stored else self._file_for_missing(name)


# -- config.json helpers ---------------------------------------------------------------------------
_MISSING = object()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"invalid JSON ({e})", path) from None
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror})", path) from None
    if not isinstance(d, dict):
        raise ConvertError("expected a JSON object", path)
    return d


class HFConfig:
    """config.json with typed getters whose errors name the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        self.d = _read_json(path)

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default: Any = _MISSING, lo: int = 1) -> int:
        v = self.d.get(key)
        if v is None:
            if default is _MISSING:
                raise ConvertError(f"{key} is missing", self.path)
            return default
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= 1 << 24:
            raise ConvertError(f"{key} = {v!r:.40} is not an integer in [{lo}, 2^24]", self.path)
        return v

    def float(self, key: str, default: float) -> float:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConvertError(f"{key} = {v!r:.40} is not a number", self.path)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConvertError(f"{key} = {v!r:.40} is not true/false", self.path)
        return v

    def unsupported(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.get('model_type')!r} model with {what} is not supported", self.path)

    def token_ids(self, folder: Path) -> tuple[int | None, list[int]]:
        """bos id and eos ids (config.json, plus generation_config.json's eos ids: Llama 3 chat
        models stop on several)."""
        bos = self.d.get("bos_token_id")
        eos: list[int] = []
        sources = [self.d.get("eos_token_id")]
        gen = folder / "generation_config.json"
        if gen.is_file():
            try:
                sources.append(json.loads(gen.read_bytes()).get("eos_token_id"))
            except (ValueError, UnicodeDecodeError, AttributeError, OSError):
                warnings.warn(f"{gen}: unreadable, ignored", stacklevel=3)
        for e in sources:
            for t in (e if isinstance(e, list) else [e]):
                if isinstance(t, int) and not isinstance(t, bool) and t >= 0 and t not in eos:
                    eos.append(t)
        return (bos if isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0 else None), eos


# -- per-architecture plans -------------------------------------------------------------------------
Tensors = dict[str, torch.Tensor]


@dataclass
class Plan:
    config: ModelConfig
    want: dict[str, tuple[int, ...]]                         # source tensor -> shape (checked first)
    globals: Callable[[], Tensors]                           # canonical non-layer resident tensors
    layer: Callable[[int], tuple[Tensors, Tensors]]          # (canonical resident, FFN kwargs)
    notes: list[str] = field(default_factory=list)


def _rope(hf: HFConfig) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either the classic (rope_theta, rope_scaling) keys or
    transformers 5's rope_parameters."""
    theta = hf.float("rope_theta", 10000.0)
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if params is None:
        return theta, None
    if not isinstance(params, dict):
        raise ConvertError(f"rope_parameters/rope_scaling is not an object: {params!r:.60}", hf.path)
    if any(isinstance(v, dict) for v in params.values()):
        raise hf.unsupported("per-layer-type RoPE parameters")
    if params.get("rope_theta") is not None:
        theta = float(params["rope_theta"])
    if params.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise hf.unsupported("partial rotary embeddings")
    kind = params.get("rope_type", params.get("type", "default"))
    try:
        if kind == "default":
            return theta, None
        if kind == "linear":
            return theta, {"rope_type": "linear", "factor": float(params["factor"])}
        if kind == "llama3":
            return theta, {"rope_type": "llama3", "factor": float(params["factor"]),
                           "low_freq_factor": float(params["low_freq_factor"]),
                           "high_freq_factor": float(params["high_freq_factor"]),
                           "original_max_position_embeddings": int(params.get(
                               "original_max_position_embeddings", hf.int("max_position_embeddings", 2048)))}
    except (KeyError, TypeError, ValueError) as e:
        raise ConvertError(f"RoPE scaling {kind!r} lacks or garbles {e}", hf.path) from None
    raise hf.unsupported(f"RoPE scaling {kind!r} (supported: default, linear, llama3)")


def _llama(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    mt = hf.get("model_type")
    if mt == "mistral" and hf.get("sliding_window") is not None:
        raise hf.unsupported(f"a sliding attention window ({hf.get('sliding_window')})")
    if hf.get("hidden_act", "silu") != "silu":
        raise hf.unsupported(f"hidden_act {hf.get('hidden_act')!r} (only silu)")
    if hf.bool("mlp_bias", False):
        raise hf.unsupported("mlp_bias (biases on the FFN projections)")
    d, L = hf.int("hidden_size"), hf.int("num_hidden_layers")
    heads = hf.int("num_attention_heads")
    kv = hf.int("num_key_value_heads", heads)
    hd = hf.int("head_dim", d // heads)
    n, V = hf.int("intermediate_size"), hf.int("vocab_size")
    if heads % kv:
        raise ConvertError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}", hf.path)
    theta, scaling = _rope(hf)
    bias, tie = hf.bool("attention_bias", False), hf.bool("tie_word_embeddings", False)
    bos, eos = hf.token_ids(folder)
    cfg = ModelConfig(arch="llama", vocab_size=V, dim=d, n_layers=L, head_dim=hd, n_heads=[heads] * L,
                      n_kv_heads=[kv] * L, ffn_dims=[n] * L, norm="rms", norm_eps=hf.float("rms_norm_eps", 1e-6),
                      act="silu", gated=True, max_positions=hf.int("max_position_embeddings", 2048),
                      rope_theta=theta, rope_scaling=scaling, attn_bias=bias, tie_embeddings=tie,
                      bos_token_id=bos, eos_token_ids=eos, name=folder.name)
    want = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,)}
    if not tie:
        want["lm_head.weight"] = (V, d)
    proj = {"q": (heads * hd, d), "k": (kv * hd, d), "v": (kv * hd, d), "o": (d, heads * hd)}
    for i in range(L):
        p = f"model.layers.{i}."
        want[p + "input_layernorm.weight"] = want[p + "post_attention_layernorm.weight"] = (d,)
        for x, shape in proj.items():
            want[p + f"self_attn.{x}_proj.weight"] = shape
            if bias:
                want[p + f"self_attn.{x}_proj.bias"] = (shape[0],)
        want[p + "mlp.gate_proj.weight"] = want[p + "mlp.up_proj.weight"] = (n, d)
        want[p + "mlp.down_proj.weight"] = (d, n)

    def globals_() -> Tensors:
        g = {"embed.weight": ck.get("model.embed_tokens.weight"), "norm.weight": ck.get("model.norm.weight")}
        if not tie:
            g["lm_head.weight"] = ck.get("lm_head.weight")
        return g

    def layer(i: int) -> tuple[Tensors, Tensors]:
        p, q = f"model.layers.{i}.", f"layers.{i}."
        r = {q + "attn_norm.weight": ck.get(p + "input_layernorm.weight"),
             q + "ffn_norm.weight": ck.get(p + "post_attention_layernorm.weight")}
        for x in proj:
            r[q + f"attn.{x}.weight"] = ck.get(p + f"self_attn.{x}_proj.weight")
            if bias:
                r[q + f"attn.{x}.bias"] = ck.get(p + f"self_attn.{x}_proj.bias")
        ffn = {"gate": ck.get(p + "mlp.gate_proj.weight"), "up": ck.get(p + "mlp.up_proj.weight"),
               "down": ck.get(p + "mlp.down_proj.weight")}
        return r, ffn

    return Plan(cfg, want, globals_, layer)


def _opt(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    act = hf.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise hf.unsupported(f"activation_function {act!r} (supported: relu, gelu)")
    d, L, heads = hf.int("hidden_size"), hf.int("num_hidden_layers"), hf.int("num_attention_heads")
    n, V, P = hf.int("ffn_dim"), hf.int("vocab_size"), hf.int("max_position_embeddings", 2048)
    e = hf.int("word_embed_proj_dim", d)
    if d % heads:
        raise ConvertError(f"hidden_size {d} is not a multiple of num_attention_heads {heads}", hf.path)
    hd = d // heads
    pre = hf.bool("do_layer_norm_before", True)
    final = pre and not hf.bool("_remove_final_layer_norm", False)    # as modeling_opt.OPTDecoder
    bias, affine = hf.bool("enable_bias", True), hf.bool("layer_norm_elementwise_affine", True)
    tie = hf.bool("tie_word_embeddings", True)
    bos, eos = hf.token_ids(folder)
    cfg = ModelConfig(arch="opt", vocab_size=V, dim=d, n_layers=L, head_dim=hd, n_heads=[heads] * L,
                      n_kv_heads=[heads] * L, ffn_dims=[n] * L, norm="layer", norm_eps=1e-5, act=act,
                      gated=False, max_positions=P, rope_theta=None, attn_bias=bias, ffn_bias=bias,
                      pre_norm=pre, final_norm=final, embed_dim=e, learned_pos=True, pos_offset=2,
                      tie_embeddings=tie, bos_token_id=bos, eos_token_ids=eos, name=folder.name)
    D = "model.decoder."
    want = {D + "embed_tokens.weight": (V, e), D + "embed_positions.weight": (P + 2, d)}
    if e != d:
        want[D + "project_in.weight"], want[D + "project_out.weight"] = (d, e), (e, d)
    if not tie:
        want["lm_head.weight"] = (V, e)
    norms = {"attn_norm": "self_attn_layer_norm", "ffn_norm": "final_layer_norm"}
    if final and affine:
        want[D + "final_layer_norm.weight"] = want[D + "final_layer_norm.bias"] = (d,)
    for i in range(L):
        p = f"{D}layers.{i}."
        for x in ("q", "k", "v", "out"):
            want[p + f"self_attn.{x}_proj.weight"] = (d, d)
            if bias:
                want[p + f"self_attn.{x}_proj.bias"] = (d,)
        if affine:
            for src in norms.values():
                want[p + f"{src}.weight"] = want[p + f"{src}.bias"] = (d,)
        want[p + "fc1.weight"], want[p + "fc2.weight"] = (n, d), (d, n)
        if bias:
            want[p + "fc1.bias"], want[p + "fc2.bias"] = (n,), (d,)

    def norm(src: str) -> Tensors:
        if affine:
            return {"weight": ck.get(src + ".weight"), "bias": ck.get(src + ".bias")}
        return {"weight": torch.ones(d), "bias": torch.zeros(d)}          # elementwise_affine=False

    def globals_() -> Tensors:
        g = {"embed.weight": ck.get(D + "embed_tokens.weight"),
             "pos_embed.weight": ck.get(D + "embed_positions.weight")}
        if e != d:
            g["project_in.weight"] = ck.get(D + "project_in.weight")
            g["project_out.weight"] = ck.get(D + "project_out.weight")
        if final:
            g.update({f"norm.{k}": v for k, v in norm(D + "final_layer_norm").items()})
        if not tie:
            g["lm_head.weight"] = ck.get("lm_head.weight")
        return g

    def layer(i: int) -> tuple[Tensors, Tensors]:
        p, q = f"{D}layers.{i}.", f"layers.{i}."
        r: Tensors = {}
        for dst, src in norms.items():
            r.update({f"{q}{dst}.{k}": v for k, v in norm(p + src).items()})
        for x, src in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "out")):
            r[q + f"attn.{x}.weight"] = ck.get(p + f"self_attn.{src}_proj.weight")
            if bias:
                r[q + f"attn.{x}.bias"] = ck.get(p + f"self_attn.{src}_proj.bias")
        ffn = {"up": ck.get(p + "fc1.weight"), "down": ck.get(p + "fc2.weight")}
        if bias:
            ffn["bias"] = ck.get(p + "fc1.bias")
            r[q + "ffn.down_bias"] = ck.get(p + "fc2.bias")
        return r, ffn

    return Plan(cfg, want, globals_, layer)


def _openelm(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    act = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}.get(hf.get("activation_fn_name", "swish"))
    if act is None:
        raise hf.unsupported(f"activation_fn_name {hf.get('activation_fn_name')!r}")
    if hf.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise hf.unsupported(f"normalization_layer_name {hf.get('normalization_layer_name')!r} (only rms_norm)")
    d, hd, L = hf.int("model_dim"), hf.int("head_dim"), hf.int("num_transformer_layers")
    V, groups = hf.int("vocab_size"), hf.int("num_gqa_groups", 1)
    glu = hf.bool("ffn_with_glu", True)
    try:
        dims = openelm_dims(d, hd, L, groups, hf.get("qkv_multipliers", 1.0), hf.get("ffn_multipliers", 4.0),
                            hf.int("ffn_dim_divisor", 256))
    except ValueError as e:
        raise ConvertError(str(e), hf.path) from None
    for key, mine in (("num_query_heads", dims.n_heads), ("num_kv_heads", dims.n_kv_heads)):
        given = hf.get(key)
        if isinstance(given, list) and given != mine:       # HF's OpenELMConfig saves the computed lists
            raise ConvertError(f"{key} = {given} disagrees with the layer-wise scaling formula ({mine})", hf.path)
    qk_norm, tie = hf.bool("normalize_qk_projections", False), hf.bool("share_input_output_layers", True)
    if not tie and not ck.has("lm_head.weight"):
        raise ConvertError("share_input_output_layers is false but there is no 'lm_head.weight'",
                           ck.path_of("lm_head.weight"))
    bos, eos = hf.token_ids(folder)
    cfg = ModelConfig(arch="openelm", vocab_size=V, dim=d, n_layers=L, head_dim=hd, n_heads=dims.n_heads,
                      n_kv_heads=dims.n_kv_heads, ffn_dims=dims.ffn_dims, norm="rms", norm_eps=1e-6, act=act,
                      gated=glu, max_positions=hf.int("max_context_length", 2048),
                      rope_theta=hf.float("rope_freq_constant", 10000.0), qk_norm=qk_norm,
                      tie_embeddings=tie, bos_token_id=bos, eos_token_ids=eos, name=folder.name)
    T = "transformer."
    want = {T + "token_embeddings.weight": (V, d), T + "norm.weight": (d,)}
    if not tie:
        want["lm_head.weight"] = (V, d)
    for i in range(L):
        p, hq, hkv, ni = f"{T}layers.{i}.", dims.n_heads[i], dims.n_kv_heads[i], dims.ffn_dims[i]
        want[p + "attn_norm.weight"] = want[p + "ffn_norm.weight"] = (d,)
        want[p + "attn.qkv_proj.weight"] = ((hq + 2 * hkv) * hd, d)
        want[p + "attn.out_proj.weight"] = (d, hq * hd)
        if qk_norm:
            want[p + "attn.q_norm.weight"] = want[p + "attn.k_norm.weight"] = (hd,)
        want[p + "ffn.proj_1.weight"] = ((2 if glu else 1) * ni, d)
        want[p + "ffn.proj_2.weight"] = (d, ni)

    def globals_() -> Tensors:
        g = {"embed.weight": ck.get(T + "token_embeddings.weight"), "norm.weight": ck.get(T + "norm.weight")}
        if not tie:
            g["lm_head.weight"] = ck.get("lm_head.weight")
        return g

    def layer(i: int) -> tuple[Tensors, Tensors]:
        p, q, hq, hkv, ni = f"{T}layers.{i}.", f"layers.{i}.", dims.n_heads[i], dims.n_kv_heads[i], dims.ffn_dims[i]
        qkv = ck.get(p + "attn.qkv_proj.weight")             # rows: all Q heads, then K, then V
        wq, wk, wv = qkv.split([hq * hd, hkv * hd, hkv * hd], dim=0)
        r = {q + "attn_norm.weight": ck.get(p + "attn_norm.weight"),
             q + "ffn_norm.weight": ck.get(p + "ffn_norm.weight"),
             q + "attn.q.weight": wq, q + "attn.k.weight": wk, q + "attn.v.weight": wv,
             q + "attn.o.weight": ck.get(p + "attn.out_proj.weight")}
        if qk_norm:
            r[q + "attn.q_norm.weight"] = ck.get(p + "attn.q_norm.weight")
            r[q + "attn.k_norm.weight"] = ck.get(p + "attn.k_norm.weight")
        p1 = ck.get(p + "ffn.proj_1.weight")                 # GLU: rows 0..n-1 gate, n..2n-1 up
        ffn = {"gate": p1[:ni], "up": p1[ni:]} if glu else {"up": p1}
        ffn["down"] = ck.get(p + "ffn.proj_2.weight")
        return r, ffn

    return Plan(cfg, want, globals_, layer)


PLANS: dict[str, Callable[[HFConfig, Checkpoint, Path], Plan]] = {
    "llama": _llama, "mistral": _llama, "opt": _opt, "openelm": _openelm,
}


# -- tokenizer --------------------------------------------------------------------------------------
def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"                  # transformers >= 4.50 saves it apart
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tc = folder / "tokenizer_config.json"
    if not tc.is_file():
        return None
    t = _read_json(tc).get("chat_template")
    if isinstance(t, list):                                  # [{"name": ..., "template": ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default", next(iter(named.values()), None))
    return t if isinstance(t, str) else None


def _tokenizer(src: Path, tokenizer: str | os.PathLike[str] | None,
               vocab_size: int) -> tuple[bytes, str | None] | None:
    if tokenizer is not None:
        tp = Path(tokenizer)
        if tp.is_dir():
            folder, tp = tp, tp / "tokenizer.json"
        else:
            folder = tp.parent
        if not tp.is_file():
            raise ConvertError("no tokenizer.json here (pass a tokenizer.json or a folder holding one)", tp)
    else:
        folder, tp = src, src / "tokenizer.json"
        if not tp.is_file():
            warnings.warn(f"{src}: no tokenizer.json; the store will take token ids only "
                          "(pass tokenizer=... / --tokenizer to add one)", stacklevel=3)
            return None
    from tokenizers import Tokenizer

    data = tp.read_bytes()
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise ConvertError(f"not a valid tokenizers JSON file: {e}", tp) from None
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        warnings.warn(f"{tp}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
                      f"model only {vocab_size} embeddings; ids beyond them will be refused", stacklevel=3)
    return data, _chat_template(folder) or (_chat_template(src) if folder != src else None)


# -- the conversion ---------------------------------------------------------------------------------
def _cast(t: torch.Tensor, dtype: torch.dtype, name: str, path: Path) -> torch.Tensor:
    """To the store dtype, refusing values float16 cannot hold (they would become inf)."""
    if dtype == torch.float16 and t.dtype != torch.float16 and t.numel():
        big = t.abs().max().item()
        if big > FP16_MAX:
            raise ConvertError(f"tensor {name!r} holds {big:.3g}, beyond float16's range: convert with "
                               "dtype bfloat16 or float32", path)
    return t.to(dtype)


def convert_hf(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "float16",
               force: bool = False, tokenizer: str | os.PathLike[str] | None = None) -> Path:
    """Convert the Hugging Face model folder SRC into the store DST (written atomically).
    `tokenizer`: a tokenizer.json, or a folder holding one (its tokenizer_config.json supplies the
    chat template), for sources that ship none (OpenELM); it takes precedence over SRC's own.
    Raises ConvertError / UnsupportedModelError naming the offending file."""
    src, dst = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if not src.exists():
        raise ConvertError("no such file or folder", src)
    if not src.is_dir():
        raise ConvertError("not a Hugging Face model folder (config.json + *.safetensors)", src)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ConvertError("the destination must not be the source folder or inside it", dst)
    cfg_path = src / CONFIG
    if not cfg_path.is_file():
        raise ConvertError(f"no {CONFIG}: not a Hugging Face model folder", src)
    hf = HFConfig(cfg_path)
    mt = hf.get("model_type")
    if mt not in PLANS:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})",
                                    cfg_path)
    ck = Checkpoint(src)
    plan = PLANS[mt](hf, ck, src)
    try:
        plan.config.validate()
    except ValueError as e:
        raise ConvertError(f"inconsistent config: {e}", cfg_path) from None
    for name, shape in plan.want.items():                    # headers only: fail before writing
        ck.check(name, shape)
    tok = _tokenizer(src, tokenizer, plan.config.vocab_size)
    target = torch.float16 if dtype == "float16" else torch.bfloat16 if dtype == "bfloat16" else torch.float32

    with StoreWriter(dst, plan.config, dtype, source=str(src), force=force) as w:
        if tok is not None:
            w.write_tokenizer(*tok)
        resident: Tensors = {}
        for i in progress(range(plan.config.n_layers), desc=f"convert {src.name}", total=plan.config.n_layers):
            r, ffn = plan.layer(i)
            resident.update({k: _cast(v, target, k, src) for k, v in r.items()})
            w.write_layer(i, **{k: _cast(v, target, f"layers.{i}.ffn.{k}", src) for k, v in ffn.items()})
        resident.update({k: _cast(v, target, k, src) for k, v in plan.globals().items()})
        w.write_resident(resident)
    return dst
