"""Mixture-of-experts checkpoints onto the store: Llama-family decoders whose MLP is a router
over E experts (models/config.py gives the layout: every expert's neurons back to back in
ffn.bin, the router resident).

- Mixtral (`mixtral`): `block_sparse_moe.gate` and experts w1 = gate, w3 = up, w2 = down; the
  top-k weights divided by their sum.
- Qwen2-MoE (`qwen2_moe`): `mlp.gate`, experts gate/up/down_proj, and a shared expert every
  token uses (resident) behind a sigmoid gate; q/k/v biases (o has none: written as zeros).
- Qwen3-MoE (`qwen3_moe`): Qwen2-MoE's experts without a shared expert, RMSNorm on each q and
  k head (qk_norm, as OpenELM), attention biases as `attention_bias` says.
- OLMoE (`olmoe`): `mlp.gate`, experts gate/up/down_proj; RMSNorm over the whole q and k
  projections (qk_norm_all).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ConvertError
from ..models.config import MAX_FFN
from .hf_archs import FFNPlan, Plan, Tensors, _llama
from .hf_source import Checkpoint, HFConfig


def _experts(
    hf: HFConfig,
    ck: Checkpoint,
    block: str,
    names: tuple[str, str, str],
    width: str,
    shared: bool = False,
    norm_topk: bool | None = None,
) -> FFNPlan:
    """The routed experts under `block` (e.g. "mlp."), their (gate, up, down) tensor names, the
    config key of an expert's width, with `shared` Qwen2-MoE's shared expert and its gate;
    `norm_topk`: whether the top-k weights are renormalised (None: config.json's norm_topk_prob;
    Mixtral always does and has no such key)."""
    E = hf.int("num_local_experts" if hf.get("num_local_experts") is not None else "num_experts")  # either name
    k = hf.int("num_experts_per_tok")
    if k > E:
        raise ConvertError(f"num_experts_per_tok = {k} exceeds the {E} experts", hf.path)
    F = hf.int(width)
    if E * F > MAX_FFN:  # before a plan of E experts' tensor names is built
        raise ConvertError(f"{E} experts of {F} neurons exceed the {MAX_FFN} a layer may hold", hf.path)
    S = hf.int("shared_expert_intermediate_size") if shared else 0
    d = hf.int("hidden_size")
    g, u, dn = names

    def want(p: str) -> dict[str, tuple[int, ...]]:
        w: dict[str, tuple[int, ...]] = {p + block + "gate.weight": (E, d)}
        for e in range(E):
            x = f"{p}{block}experts.{e}."
            w[x + g] = w[x + u] = (F, d)
            w[x + dn] = (d, F)
        if S:
            x = p + block + "shared_expert."
            w[x + "gate_proj.weight"] = w[x + "up_proj.weight"] = (S, d)
            w[x + "down_proj.weight"] = (d, S)
            w[p + block + "shared_expert_gate.weight"] = (1, d)
        return w

    def layer(p: str, q: str) -> tuple[Tensors, Tensors]:
        x = [f"{p}{block}experts.{e}." for e in range(E)]
        ffn = {
            "gate": torch.cat([ck.get(s + g) for s in x], dim=0),
            "up": torch.cat([ck.get(s + u) for s in x], dim=0),
            "down": torch.cat([ck.get(s + dn) for s in x], dim=1),
        }
        r = {q + "ffn.router.weight": ck.get(p + block + "gate.weight")}
        if S:
            for part in ("gate", "up", "down"):
                r[q + f"ffn.shared.{part}.weight"] = ck.get(f"{p}{block}shared_expert.{part}_proj.weight")
            r[q + "ffn.shared_gate.weight"] = ck.get(p + block + "shared_expert_gate.weight")
        return r, ffn

    config = {
        "n_experts": E,
        "experts_per_token": k,
        "norm_topk_prob": hf.bool("norm_topk_prob", False) if norm_topk is None else norm_topk,
    }
    if S:
        config.update(shared_expert_dim=S, shared_expert_gate=True)
    return FFNPlan(E * F, want, layer, config)


def _extend(
    plan: Plan, want: Callable[[str], dict[str, tuple[int, ...]]], extra: Callable[[str, str], Tensors]
) -> Plan:
    """`plan` with more source tensors per layer (`want`) and canonical resident ones (`extra`)."""
    base = plan.layer
    for i in range(plan.config.n_layers):
        plan.want.update(want(f"model.layers.{i}."))

    def layer(i: int) -> tuple[Tensors, Tensors]:
        r, ffn = base(i)
        r.update(extra(f"model.layers.{i}.", f"layers.{i}."))
        return r, ffn

    plan.layer = layer
    return plan


def _mixtral(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    return _llama(
        hf,
        ck,
        folder,
        _experts(
            hf, ck, "block_sparse_moe.", ("w1.weight", "w3.weight", "w2.weight"), "intermediate_size", norm_topk=True
        ),
    )


PROJ = ("gate_proj.weight", "up_proj.weight", "down_proj.weight")


def _qwen_layers(hf: HFConfig) -> None:
    """Qwen's MoE configs may interleave dense MLP layers or slide the window: not supported."""
    if hf.bool("use_sliding_window", False):
        raise hf.unsupported("a sliding attention window (use_sliding_window)")
    step = hf.int("decoder_sparse_step", 1)
    dense = hf.get("mlp_only_layers") or []
    if step != 1 or dense:
        raise hf.unsupported(f"dense layers between the expert layers (decoder_sparse_step {step}, mlp_only_layers)")


def _qwen3_moe(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    _qwen_layers(hf)
    plan = _llama(hf, ck, folder, _experts(hf, ck, "mlp.", PROJ, "moe_intermediate_size"))
    c = plan.config
    c.qk_norm = True

    def want(p: str) -> dict[str, tuple[int, ...]]:
        return {p + "self_attn.q_norm.weight": (c.head_dim,), p + "self_attn.k_norm.weight": (c.head_dim,)}

    def extra(p: str, r: str) -> Tensors:
        return {r + f"attn.{x}_norm.weight": ck.get(p + f"self_attn.{x}_norm.weight") for x in ("q", "k")}

    return _extend(plan, want, extra)


def _qwen2_moe(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    _qwen_layers(hf)
    plan = _llama(hf, ck, folder, _experts(hf, ck, "mlp.", PROJ, "moe_intermediate_size", shared=True))
    if not hf.bool("qkv_bias", True):
        return plan
    c = plan.config
    q, kv, d = c.n_heads[0] * c.head_dim, c.n_kv_heads[0] * c.head_dim, c.dim
    c.attn_bias = True

    def want(p: str) -> dict[str, tuple[int, ...]]:
        return {
            p + "self_attn.q_proj.bias": (q,),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.bias": (kv,),
        }

    def extra(p: str, r: str) -> Tensors:
        b = {r + f"attn.{x}.bias": ck.get(p + f"self_attn.{x}_proj.bias") for x in ("q", "k", "v")}
        b[r + "attn.o.bias"] = torch.zeros(d)  # o_proj has none: adding zeros is exact
        return b

    return _extend(plan, want, extra)


def _olmoe(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    if hf.get("clip_qkv") is not None:
        raise hf.unsupported(f"clip_qkv = {hf.get('clip_qkv')!r}")
    plan = _llama(hf, ck, folder, _experts(hf, ck, "mlp.", PROJ, "intermediate_size"))
    c = plan.config
    c.qk_norm = c.qk_norm_all = True
    q, kv = c.n_heads[0] * c.head_dim, c.n_kv_heads[0] * c.head_dim

    def want(p: str) -> dict[str, tuple[int, ...]]:
        return {p + "self_attn.q_norm.weight": (q,), p + "self_attn.k_norm.weight": (kv,)}

    def extra(p: str, r: str) -> Tensors:
        return {r + f"attn.{x}_norm.weight": ck.get(p + f"self_attn.{x}_norm.weight") for x in ("q", "k")}

    return _extend(plan, want, extra)


MOE_PLANS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe}
