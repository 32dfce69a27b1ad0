"""Decoding: sampling (greedy, temperature, top-p), incremental detokenization, chat templates."""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch

from .chat_template import render_chat  # noqa: F401  (re-exported: the API renders chat prompts)
from .errors import InvalidArgumentError


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise InvalidArgumentError unless temperature is finite and >= 0 and top_p is in [0, 1]."""
    for name, v in (("temperature", temperature), ("top_p", top_p)):
        try:
            float(v)
        except (TypeError, ValueError):
            raise InvalidArgumentError(f"{name} must be a number, not {v!r}") from None
    temperature, top_p = float(temperature), float(top_p)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidArgumentError(f"temperature must be a finite number >= 0 (0 = greedy), not {temperature}")
    if not 0.0 <= top_p <= 1.0:  # also rejects NaN
        raise InvalidArgumentError(f"top_p must be in [0, 1] (1 = no nucleus cut, 0 = the top token only), not {top_p}")


def sample(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None
) -> int:
    """Pick the next token from one row of logits (V,). temperature 0 means greedy. top_p keeps
    the smallest set of most likely tokens whose probabilities reach top_p, and always the most
    likely one (top_p 0: only that one)."""
    check_sampling(temperature, top_p)
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (V,)
    if not bool(torch.isfinite(probs).all()) and not bool(torch.isnan(logits).any()):
        # a temperature so small that logits / temperature overflows: its limit, greedy
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        keep = cum - sorted_p < top_p
        keep[0] = True  # always keeps the top token
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=generator)
        return int(idx[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


class IncrementalDecoder:
    """Turns a growing list of token ids into text pieces. Byte-level BPE can split a UTF-8
    character over several tokens, so a piece that ends in U+FFFD is held back until the
    character completes (or the stream ends)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of the decoded text already handed out

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def decode_stream(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    dec = IncrementalDecoder(tokenizer)
    for t in tokens:
        piece = dec.push(t)
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail
