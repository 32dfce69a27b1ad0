"""How each supported architecture maps a Hugging Face checkpoint onto the store (see
convert/hf.py for the conversion itself, convert/hf_source.py for reading the source).

A plan per `model_type`: the ModelConfig, every source tensor it needs with its expected shape
(checked against the safetensors headers before anything is written), and functions giving the
canonical resident tensors (llmflash.models.config) and each layer's FFN in Hugging Face layout.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import ConvertError
from ..models.config import ModelConfig
from ..models.openelm import openelm_dims
from .hf_source import Checkpoint, HFConfig, check_number

Tensors = dict[str, torch.Tensor]


# Tensors a checkpoint may hold that no plan reads, as transformers ignores them too: RoPE
# frequency buffers old Llama checkpoints saved per layer (computed from the config instead).
ALWAYS_UNUSED = re.compile(r"(.*\.)?rotary_emb\.inv_freq")


@dataclass
class Plan:
    config: ModelConfig
    want: dict[str, tuple[int, ...]]  # source tensor -> shape (checked first)
    globals: Callable[[], Tensors]  # canonical non-layer resident tensors
    layer: Callable[[int], tuple[Tensors, Tensors]]  # (canonical resident, FFN kwargs)
    layers_key: str = "num_hidden_layers"  # the config.json key giving the layer count
    unused: tuple[str, ...] = ()  # regexes of stored names the plan may leave

    def unused_ok(self, stored: str) -> bool:
        """Whether the checkpoint may hold `stored` without the plan reading it."""
        return bool(ALWAYS_UNUSED.fullmatch(stored)) or any(re.fullmatch(p, stored) for p in self.unused)


def _rope(hf: HFConfig) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either the classic (rope_theta, rope_scaling) keys or
    transformers 5's rope_parameters."""
    theta = hf.float("rope_theta", 10000.0, lo=1.0, lo_open=False)
    params = hf.get("rope_parameters") or hf.get("rope_scaling")
    if params is None:
        return theta, None
    if not isinstance(params, dict):
        raise ConvertError(f"rope_parameters/rope_scaling is not an object: {params!r:.60}", hf.path)
    if any(isinstance(v, dict) for v in params.values()):
        raise hf.unsupported("per-layer-type RoPE parameters")
    if params.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise hf.unsupported("partial rotary embeddings")
    kind = params.get("rope_type", params.get("type", "default"))

    def num(key: str, lo: float = 0.0, lo_open: bool = True) -> float:
        """params[key], a finite number in (lo, inf) ([lo, inf) without lo_open)."""
        if params.get(key) is None:
            raise ConvertError(f"RoPE parameters for {kind!r} are missing or malformed ({key!r} is missing)", hf.path)
        return check_number(params[key], f"RoPE parameter {key}", hf.path, lo, lo_open=lo_open)

    if params.get("rope_theta") is not None:
        theta = num("rope_theta", 1.0, lo_open=False)
    if kind == "default":
        return theta, None
    if kind == "linear":  # factor >= 1, as transformers requires
        return theta, {"rope_type": "linear", "factor": num("factor", 1.0, lo_open=False)}
    if kind == "llama3":
        n = params.get("original_max_position_embeddings")
        if n is None:
            n = hf.int("max_position_embeddings", 2048)
        elif not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= 1 << 24:
            raise ConvertError(
                f"RoPE parameter original_max_position_embeddings = {n!r:.40} is not an integer in [1, 2^24]", hf.path
            )
        s = {
            "rope_type": "llama3",
            "factor": num("factor", 1.0, lo_open=False),
            "low_freq_factor": num("low_freq_factor"),
            "high_freq_factor": num("high_freq_factor"),
            "original_max_position_embeddings": n,
        }
        if not s["high_freq_factor"] > s["low_freq_factor"]:
            raise ConvertError(
                f"RoPE parameters for {kind!r}: inconsistent values {s} (high_freq_factor must exceed low_freq_factor)",
                hf.path,
            )
        return theta, s
    raise hf.unsupported(f"RoPE scaling {kind!r} (supported: default, linear, llama3)")


def _even_head_dim(hf: HFConfig, hd: int, key: str) -> None:
    """RoPE rotates pairs of dimensions: an odd head size cannot be converted."""
    if hd % 2:
        raise ConvertError(f"{key} = {hd} is odd: RoPE needs an even head dimension", hf.path)


@dataclass
class FFNPlan:
    """A Llama-family layer's FFN, for _llama: its width, its source tensors' shapes, and its
    canonical resident tensors (a router) and FFN kwargs (gate, up, down in HF layout)."""

    width: int
    want: Callable[[str], dict[str, tuple[int, ...]]]  # layer prefix -> source tensor shapes
    layer: Callable[[str, str], tuple[Tensors, Tensors]]  # (source prefix, canonical) -> (resident, FFN)
    config: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (the experts')


def _mlp(hf: HFConfig, ck: Checkpoint) -> FFNPlan:
    """The dense SwiGLU MLP (mlp.gate_proj, up_proj, down_proj)."""
    n, d = hf.int("intermediate_size"), hf.int("hidden_size")

    def want(p: str) -> dict[str, tuple[int, ...]]:
        m = p + "mlp."
        return {m + "gate_proj.weight": (n, d), m + "up_proj.weight": (n, d), m + "down_proj.weight": (d, n)}

    def layer(p: str, q: str) -> tuple[Tensors, Tensors]:
        return {}, {x: ck.get(p + f"mlp.{x}_proj.weight") for x in ("gate", "up", "down")}

    return FFNPlan(n, want, layer)


def _llama(hf: HFConfig, ck: Checkpoint, folder: Path, ffn: FFNPlan | None = None) -> Plan:
    """Llama, Mistral and (with `ffn`, its experts) Mixtral."""
    mt = hf.get("model_type")
    if mt in ("mistral", "mixtral") and hf.get("sliding_window") is not None:
        raise hf.unsupported(f"a sliding attention window ({hf.get('sliding_window')})")
    if hf.get("hidden_act", "silu") != "silu":
        raise hf.unsupported(f"hidden_act {hf.get('hidden_act')!r} (only silu)")
    if hf.bool("mlp_bias", False):
        raise hf.unsupported("mlp_bias (biases on the FFN projections)")
    d, L = hf.int("hidden_size"), hf.int("num_hidden_layers")
    heads = hf.int("num_attention_heads")
    kv = hf.int("num_key_value_heads", heads)
    hd = hf.int("head_dim", d // heads)
    _even_head_dim(hf, hd, "head_dim" if hf.get("head_dim") is not None else "hidden_size / num_attention_heads")
    ffn = ffn or _mlp(hf, ck)
    n, V = ffn.width, hf.int("vocab_size")
    if heads % kv:
        raise ConvertError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}", hf.path)
    theta, scaling = _rope(hf)
    bias, tie = hf.bool("attention_bias", False), hf.bool("tie_word_embeddings", False)
    bos, eos = hf.token_ids(folder, V)
    cfg = ModelConfig(
        arch="llama",
        vocab_size=V,
        dim=d,
        n_layers=L,
        head_dim=hd,
        n_heads=[heads] * L,
        n_kv_heads=[kv] * L,
        ffn_dims=[n] * L,
        norm="rms",
        norm_eps=hf.float("rms_norm_eps", 1e-6, hi=1.0),
        act="silu",
        gated=True,
        max_positions=hf.int("max_position_embeddings", 2048),
        rope_theta=theta,
        rope_scaling=scaling,
        attn_bias=bias,
        tie_embeddings=tie,
        bos_token_id=bos,
        eos_token_ids=eos,
        name=folder.name,
        **ffn.config,
    )
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
        want.update(ffn.want(p))

    def globals_() -> Tensors:
        g = {"embed.weight": ck.get("model.embed_tokens.weight"), "norm.weight": ck.get("model.norm.weight")}
        if not tie:
            g["lm_head.weight"] = ck.get("lm_head.weight")
        return g

    def layer(i: int) -> tuple[Tensors, Tensors]:
        p, q = f"model.layers.{i}.", f"layers.{i}."
        r: Tensors = {
            q + "attn_norm.weight": ck.get(p + "input_layernorm.weight"),
            q + "ffn_norm.weight": ck.get(p + "post_attention_layernorm.weight"),
        }
        for x in proj:
            r[q + f"attn.{x}.weight"] = ck.get(p + f"self_attn.{x}_proj.weight")
            if bias:
                r[q + f"attn.{x}.bias"] = ck.get(p + f"self_attn.{x}_proj.bias")
        extra, weights = ffn.layer(p, q)
        r.update(extra)
        return r, weights

    unused = (r"(model\.)?lm_head\.weight",) if tie else ()  # a tied head is the embedding, as in transformers
    return Plan(cfg, want, globals_, layer, unused=unused)


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
    final = pre and not hf.bool("_remove_final_layer_norm", False)  # as modeling_opt.OPTDecoder
    bias, affine = hf.bool("enable_bias", True), hf.bool("layer_norm_elementwise_affine", True)
    tie = hf.bool("tie_word_embeddings", True)
    bos, eos = hf.token_ids(folder, V)
    cfg = ModelConfig(
        arch="opt",
        vocab_size=V,
        dim=d,
        n_layers=L,
        head_dim=hd,
        n_heads=[heads] * L,
        n_kv_heads=[heads] * L,
        ffn_dims=[n] * L,
        norm="layer",
        norm_eps=1e-5,
        act=act,
        gated=False,
        max_positions=P,
        rope_theta=None,
        attn_bias=bias,
        ffn_bias=bias,
        pre_norm=pre,
        final_norm=final,
        embed_dim=e,
        learned_pos=True,
        pos_offset=2,
        tie_embeddings=tie,
        bos_token_id=bos,
        eos_token_ids=eos,
        name=folder.name,
    )
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
        return {"weight": torch.ones(d), "bias": torch.zeros(d)}  # elementwise_affine=False

    def globals_() -> Tensors:
        g = {
            "embed.weight": ck.get(D + "embed_tokens.weight"),
            "pos_embed.weight": ck.get(D + "embed_positions.weight"),
        }
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
            r[q + "ffn.up_bias"] = ck.get(p + "fc1.bias")  # resident, store order = source
            r[q + "ffn.down_bias"] = ck.get(p + "fc2.bias")
        return r, ffn

    unused = (r"(model\.)?lm_head\.weight",) if tie else ()
    if not final:  # modeling_opt builds no final norm then
        unused += (r"(model\.)?decoder\.final_layer_norm\.(weight|bias)",)
    return Plan(cfg, want, globals_, layer, unused=unused)


def _openelm(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    act = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}.get(hf.get("activation_fn_name", "swish"))
    if act is None:
        raise hf.unsupported(f"activation_fn_name {hf.get('activation_fn_name')!r}")
    if hf.get("normalization_layer_name", "rms_norm") != "rms_norm":
        raise hf.unsupported(f"normalization_layer_name {hf.get('normalization_layer_name')!r} (only rms_norm)")
    d, hd, L = hf.int("model_dim"), hf.int("head_dim"), hf.int("num_transformer_layers")
    _even_head_dim(hf, hd, "head_dim")
    V, groups = hf.int("vocab_size"), hf.int("num_gqa_groups", 1)
    glu = hf.bool("ffn_with_glu", True)
    try:
        dims = openelm_dims(
            d,
            hd,
            L,
            groups,
            hf.get("qkv_multipliers", 1.0),
            hf.get("ffn_multipliers", 4.0),
            hf.int("ffn_dim_divisor", 256),
        )
    except ValueError as e:
        raise ConvertError(str(e), hf.path) from None
    for key, mine in (("num_query_heads", dims.n_heads), ("num_kv_heads", dims.n_kv_heads)):
        given = hf.get(key)
        if isinstance(given, list) and given != mine:  # HF's OpenELMConfig saves the computed lists
            raise ConvertError(f"{key} = {given} disagrees with the layer-wise scaling formula ({mine})", hf.path)
    qk_norm, tie = hf.bool("normalize_qk_projections", False), hf.bool("share_input_output_layers", True)
    if not tie and not ck.has("lm_head.weight"):
        raise ConvertError(
            "share_input_output_layers is false but there is no 'lm_head.weight'", ck.path_of("lm_head.weight")
        )
    bos, eos = hf.token_ids(folder, V)
    cfg = ModelConfig(
        arch="openelm",
        vocab_size=V,
        dim=d,
        n_layers=L,
        head_dim=hd,
        n_heads=dims.n_heads,
        n_kv_heads=dims.n_kv_heads,
        ffn_dims=dims.ffn_dims,
        norm="rms",
        norm_eps=1e-6,
        act=act,
        gated=glu,
        max_positions=hf.int("max_context_length", 2048),
        rope_theta=hf.float("rope_freq_constant", 10000.0, lo=1.0, lo_open=False),
        qk_norm=qk_norm,
        tie_embeddings=tie,
        bos_token_id=bos,
        eos_token_ids=eos,
        name=folder.name,
    )
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
        qkv = ck.get(p + "attn.qkv_proj.weight")  # rows: all Q heads, then K, then V
        wq, wk, wv = qkv.split([hq * hd, hkv * hd, hkv * hd], dim=0)
        r = {
            q + "attn_norm.weight": ck.get(p + "attn_norm.weight"),
            q + "ffn_norm.weight": ck.get(p + "ffn_norm.weight"),
            q + "attn.q.weight": wq,
            q + "attn.k.weight": wk,
            q + "attn.v.weight": wv,
            q + "attn.o.weight": ck.get(p + "attn.out_proj.weight"),
        }
        if qk_norm:
            r[q + "attn.q_norm.weight"] = ck.get(p + "attn.q_norm.weight")
            r[q + "attn.k_norm.weight"] = ck.get(p + "attn.k_norm.weight")
        p1 = ck.get(p + "ffn.proj_1.weight")  # GLU: rows 0..n-1 gate, n..2n-1 up
        ffn = {"gate": p1[:ni], "up": p1[ni:]} if glu else {"up": p1}
        ffn["down"] = ck.get(p + "ffn.proj_2.weight")
        return r, ffn

    unused = (r"(model\.)?lm_head\.weight",) if tie else ()
    return Plan(cfg, want, globals_, layer, layers_key="num_transformer_layers", unused=unused)


PLANS: dict[str, Callable[[HFConfig, Checkpoint, Path], Plan]] = {
    "llama": _llama,
    "mistral": _llama,
    "opt": _opt,
    "openelm": _openelm,
}
