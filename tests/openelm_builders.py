"""A small OpenELM checkpoint under the Hugging Face names (random tensors, a config.json like
Apple's): layers that differ in head count and FFN width, as layer-wise scaling makes them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

# A small config whose layers differ in head count and FFN width.
D, HD, L, GROUPS, DIVISOR, V = 128, 16, 4, 2, 32, 128


# Worked by hand from corenet's formulas: qkv multipliers linspace(0.5, 1.0, 4) rounded to 2
# places = .5 .67 .83 1 -> query dims make_divisible(128 m, 32) = 64 96 96 128; FFN multipliers
# .5 1.67 2.83 4 -> make_divisible(128 m, 32) = 64 224 352 512.
HEADS, KV_HEADS, FFN = [4, 6, 6, 8], [2, 3, 3, 4], [64, 224, 352, 512]


def hf_config(style: str = "hf", **kw) -> dict:
    """`hf`: what Apple's HF repos ship (computed per-layer lists saved alongside the pairs);
    `corenet`: only the (first, last) multiplier pairs."""
    c = {
        "architectures": ["OpenELMForCausalLM"],
        "model_type": "openelm",
        "activation_fn_name": "swish",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "ffn_dim_divisor": DIVISOR,
        "ffn_with_glu": True,
        "head_dim": HD,
        "max_context_length": 64,
        "model_dim": D,
        "normalization_layer_name": "rms_norm",
        "normalize_qk_projections": True,
        "num_gqa_groups": GROUPS,
        "num_transformer_layers": L,
        "qkv_multipliers": [0.5, 1.0],
        "ffn_multipliers": [0.5, 4.0],
        "rope_freq_constant": 10000,
        "rope_max_length": 128,
        "share_input_output_layers": True,
        "vocab_size": V,
    }
    if style == "hf":
        c.update(num_query_heads=HEADS, num_kv_heads=KV_HEADS, ffn_multipliers=[0.5, 1.67, 2.83, 4.0])
    c.update(kw)
    return c


def random_weights(seed: int = 0, tie: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: 0.15 * torch.randn(*s, generator=g)  # noqa: E731
    norm = lambda n: 1 + 0.1 * torch.randn(n, generator=g)  # noqa: E731
    w = {"transformer.token_embeddings.weight": rnd(V, D), "transformer.norm.weight": norm(D)}
    for i in range(L):
        p, hq, hkv, n = f"transformer.layers.{i}.", HEADS[i], KV_HEADS[i], FFN[i]
        w[p + "attn_norm.weight"] = norm(D)
        w[p + "ffn_norm.weight"] = norm(D)
        w[p + "attn.qkv_proj.weight"] = rnd((hq + 2 * hkv) * HD, D)
        w[p + "attn.q_norm.weight"] = norm(HD)
        w[p + "attn.k_norm.weight"] = norm(HD)
        w[p + "attn.out_proj.weight"] = rnd(D, hq * HD)
        w[p + "ffn.proj_1.weight"] = rnd(2 * n, D)
        w[p + "ffn.proj_2.weight"] = rnd(D, n)
    if not tie:
        w["lm_head.weight"] = rnd(V, D)
    return w


def save_openelm(folder: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


# -- the reference, after corenet's GeneralGPTModel / HF OpenELMForCausalLM ------------------------
def ref_rms_norm(x, weight, eps=1e-6):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def ref_rope(query, key, freq_constant=10000):
    """OpenELMRotaryEmbedding.forward: [B, H, S, hd]; queries take the last positions of the keys."""
    dim, key_len, query_len = key.shape[-1], key.shape[2], query.shape[2]
    inv_freq = 1.0 / (freq_constant ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    theta = torch.einsum("i,j->ij", torch.arange(key_len, dtype=torch.float32), inv_freq)
    emb = torch.cat((theta, theta), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]

    def rot(x, s, c):
        x1, x2 = x.chunk(2, dim=-1)
        return x * c + torch.cat((-x2, x1), dim=-1) * s

    q = rot(query.float(), sin[..., key_len - query_len : key_len, :], cos[..., key_len - query_len : key_len, :])
    k = rot(key.float(), sin[..., :key_len, :], cos[..., :key_len, :])
    return q.type_as(query), k.type_as(key)


def ref_forward(w: dict[str, torch.Tensor], ids: torch.Tensor, tie: bool = True) -> torch.Tensor:
    """Logits [S, V] for one sequence, full causal attention, no cache."""
    x = F.embedding(ids[None], w["transformer.token_embeddings.weight"])  # [1, S, d]
    B, S, _ = x.shape
    for i in range(L):
        p, hq, hkv = f"transformer.layers.{i}.", HEADS[i], KV_HEADS[i]
        y = ref_rms_norm(x, w[p + "attn_norm.weight"])
        qkv = F.linear(y, w[p + "attn.qkv_proj.weight"]).reshape(B, S, hq + 2 * hkv, HD).transpose(1, 2)
        q, k, v = qkv.split([hq, hkv, hkv], dim=1)
        q, k = ref_rms_norm(q, w[p + "attn.q_norm.weight"]), ref_rms_norm(k, w[p + "attn.k_norm.weight"])
        q, k = ref_rope(q, k)
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0, is_causal=True)
        a = a.transpose(1, 2).contiguous().reshape(B, S, hq * HD)
        x = x + F.linear(a, w[p + "attn.out_proj.weight"])
        y = ref_rms_norm(x, w[p + "ffn_norm.weight"])
        y1, y2 = F.linear(y, w[p + "ffn.proj_1.weight"]).chunk(2, dim=-1)
        x = x + F.linear(F.silu(y1) * y2, w[p + "ffn.proj_2.weight"])
    x = ref_rms_norm(x, w["transformer.norm.weight"])
    head = w["transformer.token_embeddings.weight"] if tie else w["lm_head.weight"]
    return F.linear(x, head)[0]
