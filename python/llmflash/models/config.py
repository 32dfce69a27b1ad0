"""Model configuration: one dataclass for the three architectures (Llama family, OPT, OpenELM).

The converter fills it from a Hugging Face `config.json` or GGUF metadata and stores it in the
manifest; the model code reads only this, never an HF config. Per-layer lists carry OpenELM's
layer-wise scaling (query heads, KV heads and FFN width differ per layer); for the other
architectures every entry is equal.

Canonical tensor names in `resident.safetensors` (what the model code expects):
    embed.weight                      (V, E)   token embeddings; E = embed_dim
    pos_embed.weight                  (P, D)   OPT learned positions (looked up at pos + pos_offset)
    project_in.weight                 (D, E)   OPT, when embed_dim != dim
    project_out.weight                (E, D)   OPT, when embed_dim != dim
    layers.{i}.attn_norm.weight/.bias (D,)     bias only for LayerNorm
    layers.{i}.attn.q.weight/.bias    (Hq*hd, D)
    layers.{i}.attn.k.weight/.bias    (Hkv*hd, D)
    layers.{i}.attn.v.weight/.bias    (Hkv*hd, D)
    layers.{i}.attn.o.weight/.bias    (D, Hq*hd)
    layers.{i}.attn.q_norm.weight     (hd,)    OpenELM
    layers.{i}.attn.k_norm.weight     (hd,)    OpenELM
    layers.{i}.ffn_norm.weight/.bias  (D,)
    layers.{i}.ffn.up_bias            (n_i,)   OPT fc1 bias, in store order: entry j belongs to
                                               bundle j of ffn.bin (neuron layers[i].order[j])
    layers.{i}.ffn.down_bias          (D,)     OPT fc2 bias
    norm.weight/.bias                 (D,)     final norm, when final_norm
    lm_head.weight                    (V, E)   only when not tie_embeddings
The FFN weights live in `ffn.bin` as bundles (see llmflash.store).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("llama", "opt", "openelm")


@dataclass
class ModelConfig:
    arch: str                    # "llama" | "opt" | "openelm"
    vocab_size: int
    dim: int                     # hidden size D of the decoder layers
    n_layers: int
    head_dim: int
    n_heads: list[int]           # query heads per layer
    n_kv_heads: list[int]        # key/value heads per layer (GQA when fewer than n_heads)
    ffn_dims: list[int]          # FFN neurons per layer
    norm: str = "rms"            # "rms" | "layer"
    norm_eps: float = 1e-5
    act: str = "silu"            # "silu" | "relu" | "gelu"
    gated: bool = True           # SwiGLU (gate * up) vs plain fc1 -> act -> fc2
    max_positions: int = 2048
    rope_theta: float | None = 10000.0   # None: no RoPE (OPT's learned positions)
    rope_scaling: dict[str, Any] | None = None
    attn_bias: bool = False      # q/k/v/o biases
    ffn_bias: bool = False       # fc1 bias (resident, per neuron, in store order) and fc2 bias (resident)
    qk_norm: bool = False        # RMSNorm over head_dim on q and k before RoPE (OpenELM)
    pre_norm: bool = True        # OPT do_layer_norm_before
    final_norm: bool = True
    embed_dim: int = 0           # OPT word_embed_proj_dim; 0 means == dim
    learned_pos: bool = False    # OPT
    pos_offset: int = 0          # OPT: 2
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""               # human-readable source name

    def __post_init__(self) -> None:
        if self.embed_dim == 0:
            self.embed_dim = self.dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a manifest's config; unknown keys are rejected by the caller's validation."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field (manifests are hostile)."""
        if self.arch not in ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r} (supported: {', '.join(ARCHS)})")
        for name in ("vocab_size", "dim", "n_layers", "head_dim", "embed_dim", "max_positions"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 < v <= 1 << 24:
                raise ValueError(f"config.{name} = {v!r} is not a positive integer below 2^24")
        for name in ("n_heads", "n_kv_heads", "ffn_dims"):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != self.n_layers:
                raise ValueError(f"config.{name} must list {self.n_layers} layers, got {v!r:.80}")
            if not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 1 << 24 for x in v):
                raise ValueError(f"config.{name} has a non-positive or huge entry")
        for hq, hkv in zip(self.n_heads, self.n_kv_heads):
            if hq % hkv:
                raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"config.norm = {self.norm!r} (expected 'rms' or 'layer')")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default") if isinstance(self.rope_scaling, dict) else None
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"config.rope_scaling type {kind!r} is not supported")
        if self.act not in ("silu", "relu", "gelu"):
            raise ValueError(f"config.act = {self.act!r} (expected 'silu', 'relu' or 'gelu')")

    @property
    def bundle_fields(self) -> list[tuple[str, int]]:
        """Layout of one neuron's bundle in ffn.bin, in values: [(name, length), ...]. No fc1
        bias: it stays resident (layers.{i}.ffn.up_bias), so a bundle is whole pages at
        power-of-two widths (OPT-6.7B float16: 16,384 B = 4 pages, not 16,386 B over 5)."""
        fields = [("gate", self.dim)] if self.gated else []
        return fields + [("up", self.dim), ("down", self.dim)]

    @property
    def bundle_values(self) -> int:
        return sum(n for _, n in self.bundle_fields)
