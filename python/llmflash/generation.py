"""Decoding: sampling (greedy, temperature, top-p), incremental detokenization, chat templates."""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits (V,). temperature 0 means greedy."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)              # (V,)
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        keep = cum - sorted_p < top_p                                         # always keeps the top token
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
        self.emitted = 0          # characters of the decoded text already handed out

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        piece, self.emitted = text[self.emitted:], len(text)
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


def render_chat(template: str | None, messages: list[dict[str, str]], bos_token: str = "",
                eos_token: str = "") -> str:
    """Render a Hugging Face chat template (Jinja) in a sandbox, ready for the model to answer."""
    if not template:
        # No template shipped: a plain, widely understood fallback.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos_token, eos_token=eos_token)
