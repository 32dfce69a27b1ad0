"""Reading a Hugging Face model folder: config.json with typed, bounded getters (HFConfig), the
safetensors checkpoint by tensor name (Checkpoint, headers first, tensors on demand), and the
tokenizer with its chat template. Every problem is a ConvertError naming the file and the key or
tensor. convert/hf.py converts; convert/hf_archs.py maps each architecture's tensors.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, UnsupportedModelError
from ..models.config import MAX_EXPERTS, MAX_FFN, MAX_HEADS, MAX_LAYERS, MAX_VOCAB, MAX_WIDTH, finite_number
from .common import regular_file

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# config.json keys bounded by the model limits (models/config.py says why), checked by HFConfig.int as read
LIMITS = {
    "num_hidden_layers": MAX_LAYERS,
    "num_transformer_layers": MAX_LAYERS,
    "hidden_size": MAX_WIDTH,
    "model_dim": MAX_WIDTH,
    "word_embed_proj_dim": MAX_WIDTH,
    "intermediate_size": MAX_FFN,
    "ffn_dim": MAX_FFN,
    "num_attention_heads": MAX_HEADS,
    "num_key_value_heads": MAX_HEADS,
    "head_dim": MAX_HEADS,
    "num_gqa_groups": MAX_HEADS,
    "vocab_size": MAX_VOCAB,
    "num_experts": MAX_EXPERTS,
    "num_local_experts": MAX_EXPERTS,
    "num_experts_per_tok": MAX_EXPERTS,
    "moe_intermediate_size": MAX_FFN,
    "shared_expert_intermediate_size": MAX_FFN,
}


# -- the checkpoint: tensor names -> shard files ---------------------------------------------------
class Checkpoint:
    """The tensors of a folder's safetensors files, opened lazily (headers only at first)."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.folder = folder
        index = folder / INDEX
        self.expected_in: dict[str, Path] = {}  # from the index: name -> shard
        if regular_file(index):
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise ConvertError("no weight_map object of tensor name -> file name", index)
            files = []
            for shard in dict.fromkeys(wm.values()):
                p = folder / shard
                if os.sep in shard or shard.startswith(".") or not regular_file(p):
                    raise ConvertError(f"shard {shard!r} listed in the index is missing", index)
                files.append(p)
            self.expected_in = {k: folder / v for k, v in wm.items()}
        else:
            files = sorted(folder.glob("*.safetensors"))
            for p in files:
                if not regular_file(p):
                    raise ConvertError("missing (a broken symbolic link?)", p)
        if not files:
            extra = (
                " (pytorch_model.bin checkpoints are not supported: save with safetensors)"
                if any(folder.glob("*.bin"))
                else ""
            )
            raise ConvertError(f"no *.safetensors weights in the folder{extra}", folder)
        self.files = files
        self.where: dict[str, Path] = {}
        self.handles: dict[Path, Any] = {}
        for p in files:
            try:
                h = safe_open(str(p), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise ConvertError(f"unreadable safetensors file (truncated or corrupt?): {e}", p) from None
            self.handles[p] = h
            for k in keys:
                if k in self.where:
                    raise ConvertError(f"tensor {k!r} appears in both {self.where[k].name} and {p.name}", p)
                self.where[k] = p

    def _file_for_missing(self, name: str) -> Path:
        if name in self.expected_in:
            return self.expected_in[name]
        return self.files[0] if len(self.files) == 1 else self.folder

    def resolve(self, name: str) -> str | None:
        """The stored name: checkpoints saved from the base model lack the `model.` prefix."""
        for cand in (name, name.removeprefix("model."), "model." + name):
            if cand in self.where:
                return cand
        return None

    def has(self, name: str) -> bool:
        return self.resolve(name) is not None

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        """Fail unless `name` exists with `shape` and a float dtype (reads the header only)."""
        stored = self.resolve(name)
        if stored is None:
            raise ConvertError(f"missing tensor {name!r}", self._file_for_missing(name))
        path = self.where[stored]
        sl = self.handles[path].get_slice(stored)
        got, dt = tuple(sl.get_shape()), sl.get_dtype()
        if got != shape:
            raise ConvertError(f"tensor {stored!r} has shape {got}, expected {shape}", path)
        if dt not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"tensor {stored!r} is {dt}; only float16/bfloat16/float32 "
                "weights are supported (quantized checkpoints are not)",
                path,
            )

    def get(self, name: str) -> torch.Tensor:
        stored = self.resolve(name)
        assert stored is not None, name  # the plan was checked first
        path = self.where[stored]
        try:
            return self.handles[path].get_tensor(stored)
        except Exception as e:  # safetensors raises its own error type
            raise ConvertError(f"cannot read tensor {stored!r}: {e}", path) from None

    def path_of(self, name: str) -> Path:
        stored = self.resolve(name)
        return self.where[stored] if stored else self._file_for_missing(name)


# -- config.json helpers ---------------------------------------------------------------------------
_MISSING = object()


def read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"invalid JSON ({e})", path) from None
    except RecursionError:
        raise ConvertError("invalid JSON (nested too deeply)", path) from None
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror})", path) from None
    if not isinstance(d, dict):
        raise ConvertError("expected a JSON object", path)
    return d


class HFConfig:
    """config.json with typed getters whose errors name the file and the key."""

    def __init__(self, path: Path):
        self.path = path
        self.d = read_json(path)

    def get(self, key: str, default: Any = None) -> Any:
        v = self.d.get(key)
        return default if v is None else v

    def int(self, key: str, default: Any = _MISSING, lo: int = 1) -> int:
        """An integer in [lo, LIMITS[key]] (2^24 for keys not listed), checked before anything is
        sized by it."""
        v = self.d.get(key)
        if v is None:
            if default is _MISSING:
                raise ConvertError(f"{key} is missing", self.path)
            return default
        hi = LIMITS.get(key, 1 << 24)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise ConvertError(f"{key} = {v!r:.40} is not an integer in [{lo}, {hi}]", self.path)
        return v

    def float(self, key: str, default: float, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True) -> float:
        """A finite number in (lo, hi] ([lo, hi] without lo_open): positive by default (epsilons,
        RoPE bases), so NaN, infinities, zero and negatives are errors naming the key."""
        v = self.d.get(key)
        if v is None:
            return default
        return check_number(v, key, self.path, lo, hi, lo_open)

    def bool(self, key: str, default: bool) -> bool:
        v = self.d.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise ConvertError(f"{key} = {v!r:.40} is not true/false", self.path)
        return v

    def unsupported(self, what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{self.get('model_type')!r} model with {what} is not supported", self.path)

    def token_ids(self, folder: Path, vocab_size: int | None = None) -> tuple[int | None, list[int]]:
        """bos id and eos ids (config.json, plus generation_config.json's eos ids: Llama 3 chat
        models stop on several). null and negative ids mean none; an id that is not an integer,
        or (given vocab_size) lies beyond the vocabulary, is an error naming the file and key."""

        def ids(v: Any, key: str, path: Path) -> list[int]:
            out = []
            for t in v if isinstance(v, list) else [v]:
                if t is None or (isinstance(t, int) and not isinstance(t, bool) and t < 0):
                    continue
                if not isinstance(t, int) or isinstance(t, bool) or (vocab_size is not None and t >= vocab_size):
                    raise ConvertError(
                        f"{key} = {v!r:.40} is not a token id"
                        + (f" in [0, {vocab_size})" if vocab_size is not None else ""),
                        path,
                    )
                out.append(t)
            return out

        b = self.d.get("bos_token_id")
        if isinstance(b, list):
            raise ConvertError(f"bos_token_id = {b!r:.40} is not a token id", self.path)
        bos = ids(b, "bos_token_id", self.path)
        eos: list[int] = ids(self.d.get("eos_token_id"), "eos_token_id", self.path)
        gen = folder / "generation_config.json"
        if regular_file(gen):
            try:
                g = json.loads(gen.read_bytes())
            except (ValueError, UnicodeDecodeError, OSError, RecursionError):
                warnings.warn(f"{gen}: unreadable, ignored", stacklevel=3)
            else:
                if isinstance(g, dict):
                    eos += ids(g.get("eos_token_id"), "eos_token_id", gen)
                else:
                    warnings.warn(f"{gen}: not a JSON object, ignored", stacklevel=3)
        return (bos[0] if bos else None), list(dict.fromkeys(eos))


def check_number(v: Any, key: str, path: Path, lo: float = 0.0, hi: float = math.inf, lo_open: bool = True) -> float:
    """v as a float when it is a finite number (int or float, not bool) in (lo, hi] ([lo, hi]
    without lo_open): models.config.finite_number, as a ConvertError naming `path` and `key`."""
    try:
        return finite_number(key, v, lo, hi, lo_open)
    except ValueError as e:
        raise ConvertError(str(e), path) from None


# -- tokenizer --------------------------------------------------------------------------------------
def _chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"  # transformers >= 4.50 saves it apart
    if regular_file(jinja):
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConvertError(f"unreadable chat template ({e})", jinja) from None
    tc = folder / "tokenizer_config.json"
    if not regular_file(tc):
        return None
    t = read_json(tc).get("chat_template")
    if isinstance(t, list):  # [{"name": ..., "template": ...}]
        named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
        t = named.get("default", next(iter(named.values()), None))
    return t if isinstance(t, str) else None


def read_tokenizer(
    src: Path, tokenizer: str | os.PathLike[str] | None, vocab_size: int
) -> tuple[bytes, str | None] | None:
    if tokenizer is not None:
        tp = Path(tokenizer)
        if tp.is_dir():
            folder, tp = tp, tp / "tokenizer.json"
        else:
            folder = tp.parent
        if not regular_file(tp):
            raise ConvertError("no tokenizer.json here (pass a tokenizer.json or a folder holding one)", tp)
    else:
        folder, tp = src, src / "tokenizer.json"
        if not regular_file(tp):
            warnings.warn(
                f"{src}: no tokenizer.json; the store will take token ids only "
                "(pass tokenizer=... / --tokenizer to add one)",
                stacklevel=3,
            )
            return None
    from tokenizers import Tokenizer

    try:
        data = tp.read_bytes()
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror or e})", tp) from None
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception subclass
        raise ConvertError(f"not a valid tokenizers JSON file: {e}", tp) from None
    if tok.get_vocab_size(with_added_tokens=True) > vocab_size:
        warnings.warn(
            f"{tp}: the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} tokens but the "
            f"model only {vocab_size} embeddings; ids beyond them will be refused",
            stacklevel=3,
        )
    return data, _chat_template(folder) or (_chat_template(src) if folder != src else None)
