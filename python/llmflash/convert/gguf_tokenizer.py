"""Rebuild a `tokenizers.Tokenizer` (tokenizer.json) from a GGUF file's tokenizer metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and
special ids as metadata (`tokenizer.ggml.*`). This module turns them back into a `tokenizers`
pipeline using only `tokenizers` (no transformers at run time). It follows what transformers'
own GGUF loader builds (transformers/integrations/gguf/gguf_tokenizer_mapping.py) and, where the
two differ, llama.cpp, whose pre-tokenizer rules are what the file's `tokenizer.ggml.pre` names:

  * `gpt2` (byte-level BPE: GPT-2, SmolLM2, Llama 3, Qwen2, ...): BPE over the GPT-2 byte
    alphabet, a pre-tokenizer chosen by `tokenizer.ggml.pre` (SmolLM2's "smollm" splits every
    digit on its own before the GPT-2 regex, as its original tokenizer.json and llama.cpp do;
    transformers skips the digit split, which gives the same ids for SmolLM2's vocabulary since
    it has no multi-digit tokens), ByteLevel decoder;
  * `llama` (SentencePiece BPE: Llama 1/2, Mistral, TinyLlama): BPE with byte fallback, "▁" for
    spaces (Metaspace, prefix space from `tokenizer.ggml.add_space_prefix`), merges from the file
    or, when absent, recovered from the token scores.

Tokens typed CONTROL (3) become special added tokens (never split, skipped when decoding with
skip_special_tokens); USER_DEFINED (4) become plain added tokens. BOS/EOS are prepended/appended
by a post-processor only when `tokenizer.ggml.add_bos_token` / `add_eos_token` say so.
"""

from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache
from typing import Any, Mapping

from ..errors import ConvertError, UnsupportedModelError

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split rules by `tokenizer.ggml.pre`, from llama.cpp (src/llama-vocab.cpp).
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
}
_GPT2_LIKE = {None, "", "default", "gpt2", "gpt-2"}
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact"}  # llama.cpp: "\p{N}" then the GPT-2 regex


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _get(meta: Mapping[str, Any], key: str, kind: type, path: Any, required: bool = False):
    v = meta.get(key)
    if v is None:
        if required:
            raise ConvertError(f"missing tokenizer metadata {key!r}", path)
        return None
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise ConvertError(f"tokenizer metadata {key!r} has type {type(v).__name__}", path)
    return v


def _token_list(meta: Mapping[str, Any], path: Any) -> tuple[list[str], list[int]]:
    tokens = _get(meta, "tokenizer.ggml.tokens", list, path, required=True)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise ConvertError("tokenizer.ggml.tokens is empty or not a list of strings", path)
    types = _get(meta, "tokenizer.ggml.token_type", list, path) or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ConvertError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens", path)
    return tokens, [int(t) for t in types]


def _special_id(meta: Mapping[str, Any], name: str, n: int, path: Any) -> int | None:
    v = _get(meta, f"tokenizer.ggml.{name}_token_id", int, path)
    if v is not None and not 0 <= v < n:
        raise ConvertError(f"tokenizer.ggml.{name}_token_id = {v} is outside the vocabulary of {n}", path)
    return v


def _vocab(tokens: list[str]) -> dict[str, int]:
    """token -> id, first id wins for the (rare) duplicated token strings."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _merges(
    meta: Mapping[str, Any], vocab: dict[str, int], scores: list[float] | None, path: Any
) -> list[tuple[str, str]]:
    raw = _get(meta, "tokenizer.ggml.merges", list, path)
    if raw is not None:
        out = []
        for m in raw:
            parts = m.split(" ") if isinstance(m, str) else []
            if len(parts) != 2:
                raise ConvertError(f"tokenizer.ggml.merges entry {m!r:.60} is not 'left right'", path)
            out.append((parts[0], parts[1]))
        return out
    if scores is None:
        raise ConvertError("tokenizer has neither merges nor scores to derive them from", path)
    # SentencePiece files store no merges: recover them as transformers does (generate_merges):
    # every split of a token into two vocabulary pieces, best (highest-scored) merged token first.
    by_score = {t: scores[i] for t, i in vocab.items()}
    merges = []
    for tok, score in by_score.items():
        local = [(tok[:k], tok[k:], score) for k in range(1, len(tok)) if tok[:k] in vocab and tok[k:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _post_processor(meta: Mapping[str, Any], tokens: list[str], path: Any):
    from tokenizers import processors

    n = len(tokens)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = _special_id(meta, "bos", n, path), _special_id(meta, "eos", n, path)
    single, pair, specials = ["$A:0"], ["$A:0"], []
    if add_bos and bos is not None:
        single, pair = [f"{tokens[bos]}:0"] + single, [f"{tokens[bos]}:0"] + pair
        specials.append((tokens[bos], bos))
    if add_eos and eos is not None:
        single, pair = single + [f"{tokens[eos]}:0"], pair + [f"{tokens[eos]}:0"]
        specials.append((tokens[eos], eos))
    if not specials:
        return None
    pair = pair + [p.replace(":0", ":1").replace("$A", "$B") for p in pair]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


def _byte_level(meta: Mapping[str, Any], path: Any):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens, types = _token_list(meta, path)
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # Some converters store tokens as raw UTF-8 instead of the byte alphabet: respell those.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = _vocab(spelled)
    try:
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=_merges(meta, vocab, None, path),
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        )
    except Exception as e:  # tokenizers raises its own Exception subclass for a merge not in the vocabulary
        raise ConvertError(f"cannot build the BPE tokenizer: {e}", path) from None

    pre = meta.get("tokenizer.ggml.pre")
    if pre in _DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLITS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre not in _GPT2_LIKE:
            warnings.warn(
                f"{os.fspath(path) if path else 'GGUF'}: unknown pre-tokenizer {pre!r}; using GPT-2's "
                "split rule, which may tokenize some text differently from llama.cpp",
                stacklevel=3,
            )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    _add_tokens(tok, spelled, types, alphabet)
    return tok, spelled


def _sentencepiece(meta: Mapping[str, Any], path: Any):
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tokens, types = _token_list(meta, path)
    scores = _get(meta, "tokenizer.ggml.scores", list, path)
    if scores is not None and len(scores) != len(tokens):
        raise ConvertError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens", path)
    vocab = _vocab(tokens)
    unk = _special_id(meta, "unknown", len(tokens), path)
    if unk is None:
        unk = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
    try:
        tok = Tokenizer(
            BPE(
                vocab=vocab,
                merges=_merges(meta, vocab, scores, path),
                dropout=None,
                unk_token=tokens[unk] if unk is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
    except Exception as e:
        raise ConvertError(f"cannot build the SentencePiece-BPE tokenizer: {e}", path) from None
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    _add_tokens(tok, tokens, types, None)
    return tok, tokens


def _add_tokens(tok, tokens: list[str], types: list[int], alphabet: set[str] | None) -> None:
    from tokenizers import AddedToken

    # A byte-level token marked CONTROL but spelled outside the byte alphabet is a llama.cpp
    # mislabel (transformers skips it too): adding it would grow the vocabulary past the model's.
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty == CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)


def build_tokenizer(meta: Mapping[str, Any], path: str | os.PathLike[str] | None = None):
    """A `tokenizers.Tokenizer` from GGUF metadata (a key -> Python value mapping, as
    `ReaderField.contents()` gives). `path` only names the file in error messages."""
    model = meta.get("tokenizer.ggml.model")
    if model == "gpt2":
        tok, tokens = _byte_level(meta, path)
    elif model == "llama":
        tok, tokens = _sentencepiece(meta, path)
    elif model is None:
        raise ConvertError("no tokenizer metadata (tokenizer.ggml.model)", path)
    else:
        raise UnsupportedModelError(f"tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')", path)
    post = _post_processor(meta, tokens, path)
    if post is not None:
        tok.post_processor = post
    return tok


def chat_template(meta: Mapping[str, Any]) -> str | None:
    t = meta.get("tokenizer.chat_template")
    return t if isinstance(t, str) and t else None


def tokenizer_json(meta: Mapping[str, Any], path: str | os.PathLike[str] | None = None) -> str:
    """tokenizer.json text for the GGUF's tokenizer (see build_tokenizer)."""
    s = build_tokenizer(meta, path).to_str()
    json.loads(s)  # round-trip sanity: tokenizers always emits JSON
    return s
