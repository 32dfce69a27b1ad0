"""Mixture-of-experts checkpoints onto the store: Mixtral (`mixtral`), a Llama whose MLP is
`block_sparse_moe` (a router `gate` over E experts w1 = gate, w3 = up, w2 = down). Every expert's
neurons go to ffn.bin back to back (expert e: neurons [e*F, (e+1)*F)), the router stays resident
(models/config.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from .hf_archs import FFNPlan, Plan, Tensors, _llama
from .hf_source import Checkpoint, HFConfig


def _experts(hf: HFConfig, ck: Checkpoint) -> FFNPlan:
    E, k = hf.int("num_local_experts"), hf.int("num_experts_per_tok")
    F, d = hf.int("intermediate_size"), hf.int("hidden_size")
    moe = "block_sparse_moe."

    def want(p: str) -> dict[str, tuple[int, ...]]:
        w = {p + moe + "gate.weight": (E, d)}
        for e in range(E):
            x = f"{p}{moe}experts.{e}."
            w[x + "w1.weight"] = w[x + "w3.weight"] = (F, d)
            w[x + "w2.weight"] = (d, F)
        return w

    def layer(p: str, q: str) -> tuple[Tensors, Tensors]:
        x = [f"{p}{moe}experts.{e}." for e in range(E)]
        ffn = {
            "gate": torch.cat([ck.get(s + "w1.weight") for s in x], dim=0),
            "up": torch.cat([ck.get(s + "w3.weight") for s in x], dim=0),
            "down": torch.cat([ck.get(s + "w2.weight") for s in x], dim=1),
        }
        return {q + "ffn.router.weight": ck.get(p + moe + "gate.weight")}, ffn

    return FFNPlan(E * F, want, layer, {"n_experts": E, "experts_per_token": k, "norm_topk_prob": True})


def _mixtral(hf: HFConfig, ck: Checkpoint, folder: Path) -> Plan:
    return _llama(hf, ck, folder, _experts(hf, ck))


MOE_PLANS = {"mixtral": _mixtral}
