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
    layers.{i}.attn.q_norm.weight     (hd,)    OpenELM; (Hq*hd,) with qk_norm_all (OLMoE)
    layers.{i}.attn.k_norm.weight     (hd,)    OpenELM; (Hkv*hd,) with qk_norm_all
    layers.{i}.ffn_norm.weight/.bias  (D,)
    layers.{i}.ffn.up_bias            (n_i,)   OPT fc1 bias, in store order: entry j belongs to
                                               bundle j of ffn.bin (neuron layers[i].order[j])
    layers.{i}.ffn.down_bias          (D,)     OPT fc2 bias
    layers.{i}.ffn.router.weight      (E, D)   mixture of experts: the router (gate) over E experts
    layers.{i}.ffn.shared.gate.weight (S, D)   a shared expert of S neurons every token uses (Qwen2-MoE),
    layers.{i}.ffn.shared.up.weight   (S, D)   resident; the transformer adds it to the routed sum
    layers.{i}.ffn.shared.down.weight (D, S)
    layers.{i}.ffn.shared_gate.weight (1, D)   its sigmoid gate, with shared_expert_gate
    norm.weight/.bias                 (D,)     final norm, when final_norm
    lm_head.weight                    (V, E)   only when not tie_embeddings
The FFN weights live in `ffn.bin` as bundles (see llmflash.store).

Mixture of experts (n_experts > 0, Mixtral): layer i's n_i = ffn_dims[i] neurons are its E
routed experts back to back, expert e the neurons [e*F, (e+1)*F) with F = n_i / E (each a
SwiGLU neuron like a dense model's), so an expert is one contiguous run of bundles in ffn.bin.
A token's FFN is sum over its top-k experts e of w_e * expert_e(x), the router's softmax over
all E, its top k kept (and divided by their sum when norm_topk_prob).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("llama", "opt", "openelm")
BOOL_FIELDS = (
    "gated",
    "attn_bias",
    "ffn_bias",
    "qk_norm",
    "pre_norm",
    "final_norm",
    "learned_pos",
    "tie_embeddings",
    "norm_topk_prob",
    "shared_expert_gate",
    "qk_norm_all",
)
MAX_FLOAT = 3.0e38  # about float32's largest: RoPE's tables are float32
# rope_scaling's keys per rope_type (besides rope_type itself), as the converters write them
ROPE_SCALING_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def finite_number(what: str, v: Any, lo: float, hi: float, lo_open: bool = False) -> float:
    """v as a float when it is a finite number (int or float, not bool) in [lo, hi] ((lo, hi] when
    lo_open); ValueError naming `what` otherwise."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    if ok:
        try:
            f = float(v)
        except OverflowError:  # an int beyond float's range
            ok = False
        else:
            ok = math.isfinite(f) and (lo < f if lo_open else lo <= f) and f <= hi
    if not ok:
        raise ValueError(f"{what} = {v!r:.40} is not a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return f


def check_rope_scaling(s: Any) -> None:
    """Raise ValueError unless `s` is None or a rope_scaling object the model code can use: a
    supported rope_type with exactly its keys, each a finite number in range (factor >= 1, as
    transformers requires; llama3: 0 < low_freq_factor < high_freq_factor and a positive integer
    original_max_position_embeddings)."""
    if s is None:
        return
    if not isinstance(s, dict):
        raise ValueError(f"config.rope_scaling = {s!r:.60} is not an object")
    kind = s.get("rope_type", "default")
    if not isinstance(kind, str) or kind not in ROPE_SCALING_KEYS:
        raise ValueError(
            f"config.rope_scaling type {kind!r:.40} is not supported (supported: {', '.join(ROPE_SCALING_KEYS)})"
        )
    want = ROPE_SCALING_KEYS[kind]
    missing = [k for k in want if k not in s]
    extra = sorted(str(k) for k in s if k != "rope_type" and k not in want)
    if missing or extra:
        raise ValueError(
            f"config.rope_scaling of type {kind!r}: "
            + (f"missing {missing}" if missing else f"unexpected keys {extra[:5]}")
        )
    if "factor" in want:
        finite_number("config.rope_scaling.factor", s["factor"], 1.0, MAX_FLOAT)
    if kind == "llama3":
        lo = finite_number("config.rope_scaling.low_freq_factor", s["low_freq_factor"], 0.0, MAX_FLOAT, lo_open=True)
        hi = finite_number("config.rope_scaling.high_freq_factor", s["high_freq_factor"], 0.0, MAX_FLOAT, lo_open=True)
        if not hi > lo:
            raise ValueError(f"config.rope_scaling.high_freq_factor = {hi:g} is not above low_freq_factor = {lo:g}")
        n = s["original_max_position_embeddings"]
        if not _is_int(n) or not 0 < n <= 1 << 24:
            raise ValueError(
                f"config.rope_scaling.original_max_position_embeddings = {n!r:.40} is not a positive integer below 2^24"
            )


# Upper bounds on a model's counts, far above any published model (405B Llama: 126 layers, width
# 16,384, FFN 53,248, 128 heads; the largest vocabularies ~262k) but low enough that everything
# built from them before the weights are read (per-layer lists, the plan of tensor names) stays
# small: a hostile 2^24 layers fails at once (a converter names the key; a manifest, the field)
# instead of as a MemoryError later. Positions: 2^24 (Llama 4 Scout's 10M context fits).
MAX_LAYERS = 4096
MAX_WIDTH = 1 << 17  # hidden size / embedding width
MAX_FFN = 1 << 20  # FFN (intermediate) width
MAX_HEADS = 4096  # attention heads, KV heads, head size
MAX_VOCAB = 1 << 22
MAX_POSITIONS = 1 << 24
MAX_EXPERTS = 1 << 12  # routed experts per layer (DeepSeek-V3: 256)
# fields later than the first manifests: written only when not at their default, so a store that
# uses none of them has the manifest earlier versions wrote and read
LATER_FIELDS = (
    "n_experts",
    "experts_per_token",
    "norm_topk_prob",
    "shared_expert_dim",
    "shared_expert_gate",
    "qk_norm_all",
)


@dataclass
class ModelConfig:
    arch: str  # "llama" | "opt" | "openelm"
    vocab_size: int
    dim: int  # hidden size D of the decoder layers
    n_layers: int
    head_dim: int
    n_heads: list[int]  # query heads per layer
    n_kv_heads: list[int]  # key/value heads per layer (GQA when fewer than n_heads)
    ffn_dims: list[int]  # FFN neurons per layer
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    act: str = "silu"  # "silu" | "relu" | "gelu"
    gated: bool = True  # SwiGLU (gate * up) vs plain fc1 -> act -> fc2
    max_positions: int = 2048
    rope_theta: float | None = 10000.0  # None: no RoPE (OPT's learned positions)
    rope_scaling: dict[str, Any] | None = None
    attn_bias: bool = False  # q/k/v/o biases
    ffn_bias: bool = False  # fc1 bias (resident, per neuron, in store order) and fc2 bias (resident)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE (OpenELM)
    pre_norm: bool = True  # OPT do_layer_norm_before
    final_norm: bool = True
    embed_dim: int = 0  # OPT word_embed_proj_dim; 0 means == dim
    learned_pos: bool = False  # OPT
    pos_offset: int = 0  # OPT: 2
    tie_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    name: str = ""  # human-readable source name
    n_experts: int = 0  # routed experts per layer (0: a dense FFN)
    experts_per_token: int = 0  # top-k experts a token uses per layer
    norm_topk_prob: bool = False  # the top-k router weights divided by their sum (Mixtral)
    shared_expert_dim: int = 0  # neurons of a shared expert every token uses (Qwen2-MoE; 0: none)
    shared_expert_gate: bool = False  # the shared expert scaled by sigmoid(shared_gate . x)
    qk_norm_all: bool = False  # the q/k RMSNorm spans the whole projection, not each head (OLMoE)

    def __post_init__(self) -> None:
        if _is_int(self.embed_dim) and self.embed_dim == 0:
            self.embed_dim = self.dim

    def to_dict(self) -> dict[str, Any]:
        """The manifest's config, without the LATER_FIELDS at their defaults."""
        d = dataclasses.asdict(self)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for k in LATER_FIELDS:
            if d[k] == defaults[k]:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Build from a manifest's config; unknown keys are rejected by the caller's validation."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**d)

    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field (manifests are hostile): every
        field has its type (ints are ints and not bools, bools are bools, floats are finite) and
        range, so a bad config fails here rather than as a TypeError or NaN logits later."""
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ValueError(f"unsupported architecture {self.arch!r:.40} (supported: {', '.join(ARCHS)})")
        for name, hi in (
            ("vocab_size", MAX_VOCAB),
            ("dim", MAX_WIDTH),
            ("n_layers", MAX_LAYERS),
            ("head_dim", MAX_HEADS),
            ("embed_dim", MAX_WIDTH),
            ("max_positions", MAX_POSITIONS),
        ):
            v = getattr(self, name)
            if not _is_int(v) or not 0 < v <= hi:
                raise ValueError(f"config.{name} = {v!r:.40} is not an integer in [1, {hi}]")
        if not _is_int(self.pos_offset) or not 0 <= self.pos_offset <= 1 << 24:
            raise ValueError(f"config.pos_offset = {self.pos_offset!r:.40} is not an integer in [0, 2^24]")
        for name, hi in (("n_heads", MAX_HEADS), ("n_kv_heads", MAX_HEADS), ("ffn_dims", MAX_FFN)):
            v = getattr(self, name)
            if not isinstance(v, list) or len(v) != self.n_layers:
                raise ValueError(f"config.{name} must list {self.n_layers} layers, got {v!r:.80}")
            if not all(_is_int(x) and 0 < x <= hi for x in v):
                raise ValueError(f"config.{name} has an entry that is not an integer in [1, {hi}]")
        for i, (hq, hkv) in enumerate(zip(self.n_heads, self.n_kv_heads)):
            if hq % hkv:
                raise ValueError(
                    f"query heads {hq} not a multiple of KV heads {hkv} (config.n_heads[{i}], config.n_kv_heads[{i}])"
                )
        for name in BOOL_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"config.{name} = {v!r:.40} is not true/false")
        if not isinstance(self.norm, str) or self.norm not in ("rms", "layer"):
            raise ValueError(f"config.norm = {self.norm!r:.40} (expected 'rms' or 'layer')")
        if not isinstance(self.act, str) or self.act not in ("silu", "relu", "gelu"):
            raise ValueError(f"config.act = {self.act!r:.40} (expected 'silu', 'relu' or 'gelu')")
        if not isinstance(self.name, str):
            raise ValueError(f"config.name = {self.name!r:.40} is not a string")
        finite_number("config.norm_eps", self.norm_eps, 0.0, 1.0, lo_open=True)
        if self.rope_theta is None:
            if not self.learned_pos:
                raise ValueError(
                    "config.rope_theta is null but config.learned_pos is false: "
                    "the model would have no positional information"
                )
            if self.rope_scaling is not None:
                raise ValueError("config.rope_scaling is set but config.rope_theta is null (no RoPE)")
        else:
            finite_number("config.rope_theta", self.rope_theta, 1.0, MAX_FLOAT)
            if self.head_dim % 2:
                raise ValueError(f"config.head_dim = {self.head_dim} is odd: RoPE needs an even head_dim")
            check_rope_scaling(self.rope_scaling)
        bos = self.bos_token_id
        if bos is not None and (not _is_int(bos) or not 0 <= bos < self.vocab_size):
            raise ValueError(f"config.bos_token_id = {bos!r:.40} is not a token id in [0, {self.vocab_size})")
        eos = self.eos_token_ids
        if not isinstance(eos, list):
            raise ValueError(f"config.eos_token_ids = {eos!r:.40} is not a list of token ids")
        for j, t in enumerate(eos):
            if not _is_int(t) or not 0 <= t < self.vocab_size:
                raise ValueError(f"config.eos_token_ids[{j}] = {t!r:.40} is not a token id in [0, {self.vocab_size})")
        if self.qk_norm_all and not self.qk_norm:
            raise ValueError("config.qk_norm_all is set but config.qk_norm is not")
        self._validate_experts()

    def _validate_experts(self) -> None:
        """The mixture-of-experts fields: none, or E experts, top-k in [1, E], every layer's
        neurons E experts of equal width, a gated FFN without biases."""
        e, k = self.n_experts, self.experts_per_token
        if not _is_int(e) or not 0 <= e <= MAX_EXPERTS:
            raise ValueError(f"config.n_experts = {e!r:.40} is not an integer in [0, {MAX_EXPERTS}]")
        if not _is_int(k) or not (1 <= k <= e if e else k == 0):
            raise ValueError(f"config.experts_per_token = {k!r:.40} is not an integer in [{min(e, 1)}, {e}]")
        if not e:
            if self.shared_expert_dim != 0 or self.shared_expert_gate is not False:
                raise ValueError(
                    "config.shared_expert_dim/shared_expert_gate are set without experts (config.n_experts)"
                )
            return
        for i, n in enumerate(self.ffn_dims):
            if n % e:
                raise ValueError(f"config.ffn_dims[{i}] = {n} is not {e} experts (config.n_experts) of equal width")
        if not self.gated or self.ffn_bias or self.act != "silu":
            raise ValueError(
                "config.n_experts is set but the FFN is not SiLU-gated without biases (experts are SwiGLU)"
            )
        s = self.shared_expert_dim
        if not _is_int(s) or not 0 <= s <= MAX_FFN:
            raise ValueError(f"config.shared_expert_dim = {s!r:.40} is not an integer in [0, {MAX_FFN}]")
        if self.shared_expert_gate and not s:
            raise ValueError("config.shared_expert_gate is set without a shared expert (config.shared_expert_dim)")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def expert_dim(self, layer: int) -> int:
        """Neurons of one expert of `layer` (mixture of experts only)."""
        return self.ffn_dims[layer] // self.n_experts

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
