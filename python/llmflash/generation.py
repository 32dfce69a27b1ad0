"""Decoding: sampling (greedy, temperature, top-p), incremental detokenization, chat templates."""

from __future__ import annotations

import math
import os
from typing import Any, Iterable, Iterator

import torch

from .errors import ChatTemplateError, InvalidArgumentError

# Limits on rendering a chat template (it comes with the store, so it may be hostile or broken):
# the jinja2 sandbox blocks unsafe attributes but not work, so one render may create at most
# TEMPLATE_RANGE_ITEMS items with range() in all, build no string or list longer than
# TEMPLATE_SEQUENCE_ITEMS by * or +, and write at most TEMPLATE_OUTPUT_CHARS characters (plus 8
# per character of the messages).
TEMPLATE_RANGE_ITEMS = 1_000_000
TEMPLATE_SEQUENCE_ITEMS = 1_000_000
TEMPLATE_OUTPUT_CHARS = 1_000_000


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
    if not 0.0 <= top_p <= 1.0:             # also rejects NaN
        raise InvalidArgumentError(f"top_p must be in [0, 1] (1 = no nucleus cut, 0 = the top token only), "
                                   f"not {top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """Pick the next token from one row of logits (V,). temperature 0 means greedy. top_p keeps
    the smallest set of most likely tokens whose probabilities reach top_p, and always the most
    likely one (top_p 0: only that one)."""
    check_sampling(temperature, top_p)
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)              # (V,)
    if not bool(torch.isfinite(probs).all()) and not bool(torch.isnan(logits).any()):
        # a temperature so small that logits / temperature overflows: its limit, greedy
        return int(torch.argmax(logits))
    if top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=-1)
        keep = cum - sorted_p < top_p
        keep[0] = True                                                        # always keeps the top token
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


def _limited_sandbox():
    """An ImmutableSandboxedEnvironment that bounds the work of one render (see the limits above)."""
    from jinja2.exceptions import TemplateRuntimeError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def too_big(seq: Any, n: Any) -> bool:
        return (isinstance(seq, (str, list, tuple)) and isinstance(n, int)
                and len(seq) * n > TEMPLATE_SEQUENCE_ITEMS)

    class Limited(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*" and (too_big(left, right) or too_big(right, left)):
                raise TemplateRuntimeError(f"a repetition longer than {TEMPLATE_SEQUENCE_ITEMS} items")
            if (operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple))
                    and len(left) + len(right) > TEMPLATE_SEQUENCE_ITEMS):
                raise TemplateRuntimeError(f"a concatenation longer than {TEMPLATE_SEQUENCE_ITEMS} items")
            if (operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1
                    and right > 0 and abs(left).bit_length() * right > 1 << 16):
                raise TemplateRuntimeError(f"a power too large ({left} ** {right})")
            return super().call_binop(context, operator, left, right)

    env = Limited(trim_blocks=True, lstrip_blocks=True)
    left = [TEMPLATE_RANGE_ITEMS]

    def limited_range(*args: Any) -> range:
        r = range(*args)
        try:
            n = len(r)
        except OverflowError:
            n = TEMPLATE_RANGE_ITEMS + 1
        left[0] -= n
        if left[0] < 0:
            raise TemplateRuntimeError(f"range() would create more than {TEMPLATE_RANGE_ITEMS} items in one render")
        return r

    def raise_exception(message: str) -> None:
        raise ChatTemplateError(f"chat template: {message}")

    env.globals["range"] = limited_range
    env.globals["raise_exception"] = raise_exception
    return env


def render_chat(template: str | None, messages: list[dict[str, str]], bos_token: str = "",
                eos_token: str = "", source: str | os.PathLike[str] | None = None) -> str:
    """Render a Hugging Face chat template (Jinja) in a sandbox, ready for the model to answer.
    Any failure (syntax, an undefined or unsafe access, the template's own raise_exception, the
    work limits above) is a ChatTemplateError naming `source` (where the template came from)."""
    if not template:
        # No template shipped: a plain, widely understood fallback.
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    limit = TEMPLATE_OUTPUT_CHARS + 8 * sum(len(str(m.get("content", ""))) for m in messages)
    try:
        tmpl = _limited_sandbox().from_string(template)
        out, size = [], 0
        for piece in tmpl.generate(messages=messages, add_generation_prompt=True, bos_token=bos_token,
                                   eos_token=eos_token):
            size += len(piece)
            if size > limit:
                raise ChatTemplateError(f"chat template: output longer than {limit} characters", source)
            out.append(piece)
        return "".join(out)
    except ChatTemplateError as e:
        if e.path is None and source is not None:
            raise ChatTemplateError(str(e), source) from None
        raise
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse (line {e.lineno}): {e.message}", source) from None
    except (TemplateError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError,
            RecursionError) as e:
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}", source) from None
