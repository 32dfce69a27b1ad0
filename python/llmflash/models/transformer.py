"""The decoder-only transformer for every supported architecture (Llama family, OPT, OpenELM),
driven by ModelConfig flags, with the FFN plugged in from outside (models/ffn.py: the FFN
interface; llmflash.strategies implements it).

    model = Transformer.from_store(store, DenseFFN(store))   # or Transformer(config, resident, ffn)
    cache = model.new_cache(64)
    logits = model.forward(torch.tensor(prompt_ids), cache)      # (T, V) float32, cache advanced
    logits = model.forward(torch.tensor([next_id]), cache)       # one more token

One sequence at a time (batch 1: the case the paper optimises). Per layer:

    pre-norm  (Llama, OpenELM, OPT >= 1.3B):  x = x + attn(norm1(x));  x = x + ffn(norm2(x))
    post-norm (OPT-350m):                     x = norm1(x + attn(x));  x = norm2(x + ffn(x))

The residual stream is float32 whatever the store dtype; matrix products take weights in the
store dtype and give float32 (models/layers.py: `linear`, and the precision rules).

On a GPU (`device`, llmflash.device) every resident tensor, the KV cache and the RoPE tables live
there and the tokens go there; the logits come back as they are (the caller moves what it needs).
A quantized store's block kernels are CPU code: such a model runs on the CPU only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from ..device import on_cpu
from ..errors import InvalidArgumentError, LlmflashError, StoreError
from ..threads import decode_threads, native_decode
from .config import ModelConfig
from .ffn import FFN
from .layers import (
    apply_rope,
    causal_attention,
    decode_attention,
    embedding,
    layer_norm,
    linear,
    rms_norm,
    rope_inv_freq,
    rope_tables,
    table_rows,
)
from .native_decode import cache_fits, decode_layers, native_decoder, native_layers
from .quant import QTensor


class ContextLengthError(LlmflashError, ValueError):
    """A sequence ran past the positions a model with learned position embeddings has."""


KV_STEP = 256  # positions a KV cache grows by at least (and what a generation reserves ahead)
PREFILL_CHUNK = 512  # tokens one pass runs through the layers at once: bounds a long prompt's activations
CHUNK_BYTES = 16 << 20  # ... and fewer for wide models: a chunk's float32 activations stay about this size


class KVCache:
    """Keys (after RoPE) and values of one sequence, per layer: k[i], v[i] (Hkv_i, capacity, hd)
    in the compute dtype; positions 0..length-1 are filled. Memory follows the tokens that came:
    when a forward needs more room the cache grows by a quarter (at least KV_STEP positions), one
    layer at a time (the only extra memory while growing is one layer's old buffer), up to `limit`
    positions when the model has one (learned positions). Capacity <= 1.25 x length + KV_STEP."""

    def __init__(
        self,
        n_kv_heads: list[int],
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        limit: int | None = None,
        device: torch.device | None = None,
    ):
        capacity = max(1, capacity if limit is None else min(capacity, limit))
        self.k = [torch.zeros(h, capacity, head_dim, dtype=dtype, device=device) for h in n_kv_heads]
        self.v = [torch.zeros(h, capacity, head_dim, dtype=dtype, device=device) for h in n_kv_heads]
        self.length = 0
        self.limit = limit

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    def reserve(self, n: int) -> None:
        """Make room for n positions in all."""
        if self.limit is not None and n > self.limit:
            raise ContextLengthError(
                f"sequence of {n} tokens exceeds the model's {self.limit} positions "
                "(learned position embeddings cannot extrapolate)"
            )
        if n <= self.capacity:
            return
        cap = max(n, self.capacity + max(KV_STEP, self.capacity // 4))
        if self.limit is not None:
            cap = min(cap, self.limit)
        for buf in (self.k, self.v):
            for i in range(len(buf)):
                t = buf[i]
                grown = t.new_zeros(t.shape[0], cap, t.shape[2])
                grown[:, : self.length] = t[:, : self.length]
                buf[i] = grown
                del t, grown  # the old buffer goes now, before the next layer's grows

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))


class Weights(Protocol):
    """Where a model's resident weights come from (an llmflash.store.Store): the config, the
    dtype, the folder (named in errors) and the resident tensors by canonical name."""

    config: ModelConfig
    dtype: torch.dtype
    path: os.PathLike[str]

    def resident(self) -> dict[str, Tensor | QTensor]: ...


@dataclass
class Norm:
    weight: Tensor  # (D,) float32
    bias: Tensor | None  # (D,) float32, LayerNorm only


@dataclass
class Layer:
    attn_norm: Norm
    ffn_norm: Norm
    q: Tensor | QTensor  # (Hq*hd, D)
    k: Tensor | QTensor  # (Hkv*hd, D)
    v: Tensor | QTensor  # (Hkv*hd, D)
    o: Tensor | QTensor  # (D, Hq*hd)
    q_b: Tensor | None  # attention biases (OPT, Llama with attention_bias)
    k_b: Tensor | None
    v_b: Tensor | None
    o_b: Tensor | None
    q_norm: Tensor | None  # (hd,) float32, OpenELM
    k_norm: Tensor | None
    down_bias: Tensor | None  # (D,) float32, OPT fc2 bias
    n_heads: int
    n_kv_heads: int
    shared: tuple[Tensor, Tensor, Tensor] | None = None  # a shared expert's gate, up, down (Qwen2-MoE)
    shared_gate: Tensor | None = None  # (1, D) its sigmoid gate


class Transformer:
    def __init__(
        self,
        config: ModelConfig,
        resident: dict[str, Any],
        ffn: FFN,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ):
        c = self.config = config
        self.ffn = ffn
        self.source: str | os.PathLike[str] | None = None  # the store, named in errors
        self.dtype = dtype or resident["embed.weight"].dtype
        dev = self.device = device or torch.device("cpu")
        if not on_cpu(dev) and any(isinstance(t, QTensor) for t in resident.values()):
            raise InvalidArgumentError(f"a quantized model runs on the CPU only (device {dev} asked): use --device cpu")
        # a quantized store's matrices stay QTensors (their blocks); everything else in self.dtype
        w = lambda name: resident[name] if isinstance(resident[name], QTensor) else resident[name].to(dev, self.dtype)  # noqa: E731
        f32 = lambda name: resident[name].to(dev, torch.float32)  # noqa: E731
        opt = lambda name, conv: conv(name) if name in resident else None  # noqa: E731

        self.embed = w("embed.weight")  # (V, E)
        # a quantized store's products all run natively: its decode takes decode_threads() at any width
        self.quantized = any(isinstance(t, QTensor) for t in resident.values())
        self.pos_embed = opt("pos_embed.weight", w)  # (P + offset, D)
        self.project_in = opt("project_in.weight", w)  # (D, E)
        self.project_out = opt("project_out.weight", w)  # (E, D)
        self.norm = Norm(f32("norm.weight"), opt("norm.bias", f32)) if c.final_norm else None
        self.lm_head = self.embed if c.tie_embeddings else w("lm_head.weight")  # (V, E)
        self.layers: list[Layer] = []
        for i in range(c.n_layers):
            p = f"layers.{i}."
            self.layers.append(
                Layer(
                    attn_norm=Norm(f32(p + "attn_norm.weight"), opt(p + "attn_norm.bias", f32)),
                    ffn_norm=Norm(f32(p + "ffn_norm.weight"), opt(p + "ffn_norm.bias", f32)),
                    q=w(p + "attn.q.weight"),
                    k=w(p + "attn.k.weight"),
                    v=w(p + "attn.v.weight"),
                    o=w(p + "attn.o.weight"),
                    q_b=opt(p + "attn.q.bias", w),
                    k_b=opt(p + "attn.k.bias", w),
                    v_b=opt(p + "attn.v.bias", w),
                    o_b=opt(p + "attn.o.bias", w),
                    q_norm=opt(p + "attn.q_norm.weight", f32),
                    k_norm=opt(p + "attn.k_norm.weight", f32),
                    down_bias=opt(p + "ffn.down_bias", f32),
                    n_heads=c.n_heads[i],
                    n_kv_heads=c.n_kv_heads[i],
                    shared=tuple(w(p + f"ffn.shared.{x}.weight") for x in ("gate", "up", "down"))  # type: ignore[arg-type]
                    if c.shared_expert_dim
                    else None,
                    shared_gate=opt(p + "ffn.shared_gate.weight", w),
                )
            )
        self.inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling) if c.rope_theta is not None else None
        self._cos = self._sin = torch.empty(0)
        # float32 values a token's pass holds at once: residual, norm, q/k/v/attention out, FFN hidden
        per_token = 4 * (6 * c.dim + 3 * max(c.ffn_dims))
        self.prefill_chunk = max(64, min(PREFILL_CHUNK, CHUNK_BYTES // per_token))
        # a quantized RMSNorm model's decode token: each layer's attention half in one native call
        self.native_layers = native_layers(self)
        self._decoder: tuple[Any, Any, Any] = (None, None, None)  # (FFN, native_layers, QDecoder or None)

    @property
    def native_decoder(self) -> Any | None:
        """The whole-token native decoder (models/native_decode.native_decoder) for the current
        FFN and native layers, or None; built again when either object changes."""
        ffn, layers, decoder = self._decoder
        if ffn is not self.ffn or layers is not self.native_layers:
            decoder = native_decoder(self)
            self._decoder = (self.ffn, self.native_layers, decoder)
        return decoder

    @classmethod
    def from_store(cls, store: Weights, ffn: FFN, device: torch.device | None = None) -> "Transformer":
        """A model over `store`'s resident weights (a Store checks them against the config) and
        `ffn`, on `device` (default the CPU)."""
        if device is not None and not on_cpu(device) and getattr(store, "quant", None):
            raise InvalidArgumentError(
                f"a quantized store runs on the CPU only (device {device} asked): use --device cpu", store.path
            )
        model = cls(store.config, store.resident(), ffn, dtype=store.dtype, device=device)
        model.source = store.path
        return model

    def new_cache(self, max_len: int) -> KVCache:
        """An empty KV cache with room for max_len positions (it grows when needed: callers that
        only may reach max_len, like a generation, pass what they know will come)."""
        c = self.config
        limit = c.max_positions if c.learned_pos else None
        return KVCache(c.n_kv_heads, c.head_dim, max_len, self.dtype, limit=limit, device=self.device)

    # -- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache, last_only: bool = False) -> Tensor:
        """tokens (T,) int64 continuing the sequence at cache.length -> logits (T, V) float32,
        or (1, V) for the last position only with last_only (what generation needs: it spares
        the LM head's T x V product at prefill). The cache advances by T."""
        if tokens.dim() != 1 or tokens.numel() == 0:
            raise ValueError(f"tokens must be a non-empty 1-D tensor, got shape {tuple(tokens.shape)}")
        tokens = tokens.to(self.device)
        T, chunk = tokens.shape[0], min(self.prefill_chunk, PREFILL_CHUNK)
        if T > chunk:
            # a long prompt in chunks, each attending to the cache the chunks before filled: the
            # activations and attention scores stay those of one chunk (memory linear in the
            # prompt: its KV cache), with the same logits up to float rounding. The price: a
            # strategy that reads the FFN from flash reads it once a chunk, not once a prompt.
            cache.reserve(cache.length + T)
            # (with last_only, every chunk computes one row of logits, not chunk x vocab)
            outs = [self.forward(tokens[a : a + chunk], cache, last_only) for a in range(0, T, chunk)]
            return outs[-1] if last_only else torch.cat(outs)
        # one token of a large float16 model or a quantized one: the products run natively,
        # torch's ops on one thread
        native = on_cpu(self.device) and (self.quantized or native_decode(self.config.dim, self.dtype))
        with decode_threads(T == 1 and native):
            return self._forward(tokens, cache, last_only, T, cache.length)

    __call__ = forward

    def _forward(self, tokens: Tensor, cache: KVCache, last_only: bool, T: int, start: int) -> Tensor:
        c = self.config
        cache.reserve(start + T)
        x = embedding(tokens, self.embed)  # (T, E) float32
        if self.project_in is not None:
            x = linear(x, self.project_in)  # (T, D)
        if self.pos_embed is not None:
            x = x + table_rows(self.pos_embed, start + c.pos_offset, start + c.pos_offset + T)
        cos, sin = self._rope(start, T)
        if T == 1 and self.native_layers is not None and cache_fits(cache):
            x = decode_layers(self, x, cache, start, cos, sin)
        else:
            x = self._layers(x, cache, start, cos, sin)
        cache.length = start + T
        if last_only:
            x = x[-1:]
        if self.norm is not None:
            x = self._norm(x, self.norm)
        if self.project_out is not None:
            x = linear(x, self.project_out)  # (T, E)
        logits = linear(x, self.lm_head)  # (T, V)
        # NaN/Inf anywhere in the weights or activations reaches the logits (norms, softmax and
        # sums spread it): one cheap check here instead of a token picked from NaNs
        if not bool(torch.isfinite(logits).all()):
            raise StoreError(
                f"the model computed non-finite logits (NaN or Inf) at positions {start}.."
                f"{start + T - 1}: its weights hold non-finite or overflowing values "
                "(`llmflash verify` checks a store)",
                self.source,
            )
        return logits

    def _layers(self, x: Tensor, cache: KVCache, start: int, cos: Tensor | None, sin: Tensor | None) -> Tensor:
        """x (T, D) through every layer, in torch; the cache gets the tokens' keys and values."""
        early = getattr(self.ffn, "early", None)
        for i, L in enumerate(self.layers):
            if self.config.pre_norm:
                if early is not None:  # flash lookahead="attention": guess this layer's set now
                    early(i, self._norm(x, L.ffn_norm).to(self.dtype))
                x = x + self._attention(i, L, self._norm(x, L.attn_norm), cache, start, cos, sin)
                x = x + self._ffn(i, L, self._norm(x, L.ffn_norm))
            else:
                x = self._norm(x + self._attention(i, L, x, cache, start, cos, sin), L.attn_norm)
                x = self._norm(x + self._ffn(i, L, x), L.ffn_norm)
        return x

    def _norm(self, x: Tensor, n: Norm) -> Tensor:
        if self.config.norm == "rms":
            return rms_norm(x, n.weight, self.config.norm_eps)
        return layer_norm(x, n.weight, n.bias, self.config.norm_eps)  # type: ignore[arg-type]

    def _rope(self, start: int, T: int) -> tuple[Tensor | None, Tensor | None]:
        if self.inv_freq is None:
            return None, None
        if self._cos.shape[0] < start + T:  # grow the tables
            cos, sin = rope_tables(self.inv_freq, max(start + T, 2 * self._cos.shape[0], 256))
            self._cos, self._sin = cos.to(self.device), sin.to(self.device)
        return self._cos[start : start + T], self._sin[start : start + T]  # (T, hd) each

    def _attention(
        self, i: int, L: Layer, x: Tensor, cache: KVCache, start: int, cos: Tensor | None, sin: Tensor | None
    ) -> Tensor:
        """x (T, D) -> (T, D) float32; writes this layer's keys and values into the cache."""
        c, hd, T = self.config, self.config.head_dim, x.shape[0]
        q, k = linear(x, L.q, L.q_b), linear(x, L.k, L.k_b)  # (T, Hq*hd), (T, Hkv*hd)
        if c.qk_norm_all and L.q_norm is not None and L.k_norm is not None:  # OLMoE: whole projections
            q, k = rms_norm(q, L.q_norm, c.norm_eps), rms_norm(k, L.k_norm, c.norm_eps)
        q = q.view(T, L.n_heads, hd).transpose(0, 1)  # (Hq, T, hd)
        k = k.view(T, L.n_kv_heads, hd).transpose(0, 1)  # (Hkv, T, hd)
        v = linear(x, L.v, L.v_b).view(T, L.n_kv_heads, hd).transpose(0, 1)  # (Hkv, T, hd)
        if not c.qk_norm_all and L.q_norm is not None and L.k_norm is not None:  # OpenELM, before RoPE
            q, k = rms_norm(q, L.q_norm, c.norm_eps), rms_norm(k, L.k_norm, c.norm_eps)
        if cos is not None and sin is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i][:, start : start + T] = k
        cache.v[i][:, start : start + T] = v
        if T == 1:  # decode: the cache as stored
            out = decode_attention(q, cache.k[i], cache.v[i], start + 1)  # (1, Hq*hd)
        else:
            keys = cache.k[i][:, : start + T].float()  # (Hkv, S, hd)
            values = cache.v[i][:, : start + T].float()
            out = causal_attention(q, keys, values, start)  # (T, Hq*hd)
        return linear(out, L.o, L.o_b)  # (T, D)

    def _ffn(self, i: int, L: Layer, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        y = self.ffn(i, x).float()  # (T, D)
        if L.shared is not None:  # resident, every token: a mixture of experts' shared expert
            g, u, d = L.shared
            s = linear(torch.nn.functional.silu(linear(x, g)) * linear(x, u), d)
            if L.shared_gate is not None:
                s = torch.sigmoid(linear(x, L.shared_gate)) * s
            y = y + s.float()
        return y + L.down_bias if L.down_bias is not None else y


def greedy(
    model: Transformer, prompt: list[int], max_new_tokens: int, eos_token_ids: list[int] | None = None
) -> list[int]:
    """Greedy continuation of `prompt` with a KV cache: the new token ids (stops after an EOS)."""
    cache = model.new_cache(len(prompt) + min(max_new_tokens, KV_STEP))
    logits = model.forward(torch.tensor(prompt, dtype=torch.long), cache, last_only=True)[-1]
    out: list[int] = []
    for step in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        out.append(tok)
        if eos_token_ids and tok in eos_token_ids or step + 1 == max_new_tokens:
            break
        logits = model.forward(torch.tensor([tok], dtype=torch.long), cache)[-1]
    return out
