"""Shared fixtures: tiny random-weight Hugging Face models saved with save_pretrained (safetensors)
into session temp folders, and helpers to build and convert them. Small enough that the whole
suite builds them in a couple of seconds."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch

os.environ.setdefault("LLMFLASH_QUIET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from store_builders import write_store  # noqa: E402  (after LLMFLASH_QUIET)

VOCAB = 128


@dataclass
class HFModel:
    path: Path  # the save_pretrained folder
    model: Any  # the transformers model (float32, eval mode)


@contextmanager
def python_counter() -> Iterator[list[int]]:
    """A Python thread that counts as fast as it can while the block runs; yields its one-element
    counter. A native call that holds the GIL freezes it (a few increments at most)."""
    count, stop = [0], threading.Event()

    def counter():
        while not stop.is_set():
            count[0] += 1

    th = threading.Thread(target=counter)
    th.start()
    try:
        time.sleep(0.01)
        yield count
    finally:
        stop.set()
        th.join()


def tiny_tokenizer_json(vocab: int = VOCAB) -> str:
    """A word-level tokenizer over `vocab` tokens (t0 .. t{vocab-1}), whitespace split."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def build_hf(kind: str, folder: Path, seed: int = 0, max_shard_size: str | None = None, **overrides) -> HFModel:
    """Build a seeded random model of `kind` ("llama" | "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "opt"),
    save it to `folder`."""
    import transformers

    torch.manual_seed(seed)
    # Llama-family decoders (the MoE ones too): initialisation wider than the default 0.02, so
    # logits lie far enough apart that greedy choices are stable under float32 rounding
    # differences between implementations.
    llama = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.15,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    # the mixtures of experts: 8 experts of 32 neurons, top-2 (Qwen2-MoE with a shared expert)
    moe = {
        "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig, dict(num_local_experts=8)),
        "qwen2_moe": (
            transformers.Qwen2MoeForCausalLM,
            transformers.Qwen2MoeConfig,
            dict(num_experts=8, moe_intermediate_size=32, shared_expert_intermediate_size=40, pad_token_id=0),
        ),
        "qwen3_moe": (
            transformers.Qwen3MoeForCausalLM,
            transformers.Qwen3MoeConfig,
            dict(num_experts=8, moe_intermediate_size=32, norm_topk_prob=True, head_dim=16, pad_token_id=0),
        ),
        "olmoe": (transformers.OlmoeForCausalLM, transformers.OlmoeConfig, dict(num_experts=8, pad_token_id=0)),
    }
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**llama, **overrides}))
    elif kind in moe:
        cls, config, extra = moe[kind]
        kw = {**llama, "intermediate_size": 32, "num_experts_per_tok": 2, **extra, **overrides}
        model = cls(config(**kw))
    elif kind == "opt":
        kw = dict(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            init_std=0.15,
            dropout=0.0,
            bos_token_id=2,
            eos_token_id=2,
            pad_token_id=1,
        )
        kw.update(overrides)
        model = transformers.OPTForCausalLM(transformers.OPTConfig(**kw))
    else:
        raise ValueError(kind)
    # Norms start at (1, 0) and biases at 0: randomise every 1-D parameter so the mapping of
    # each one (which norm is which, which bias goes where) is actually tested.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(folder, **kwargs)
    return HFModel(folder, model)


@pytest.fixture(scope="session")
def make_hf(tmp_path_factory) -> Callable[..., HFModel]:
    """make_hf(name, kind, **config_overrides): built once per session per name."""
    built: dict[str, HFModel] = {}

    def make(name: str, kind: str, **kw) -> HFModel:
        if name not in built:
            built[name] = build_hf(kind, tmp_path_factory.mktemp(name), **kw)
        return built[name]

    return make


@pytest.fixture(scope="session")
def hf_llama(make_hf) -> HFModel:
    """GQA Llama (4 query heads, 2 KV heads), untied LM head, with a tokenizer and chat template."""
    m = make_hf("llama", "llama")
    (m.path / "tokenizer.json").write_text(tiny_tokenizer_json())
    (m.path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"})
    )
    return m


@pytest.fixture(scope="session")
def hf_opt(make_hf) -> HFModel:
    return make_hf("opt", "opt")


@pytest.fixture(scope="session")
def convert_to(tmp_path_factory) -> Callable[..., Path]:
    """convert_to(src, dtype="float32", **kw) -> a fresh store folder."""
    from llmflash.convert.hf import convert_hf

    def convert(src: Path, dtype: str = "float32", **kw) -> Path:
        dst = tmp_path_factory.mktemp("store") / "model.llmflash"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no tokenizer.json" for most fixtures
            return convert_hf(src, dst, dtype=dtype, **kw)

    return convert


def flip_bit(path: Path, offset: int) -> None:
    """Flip the lowest bit of the byte at `offset` of the file `path`, durably (fsync): a one-bit
    corruption of a store file on disk."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
        f.flush()
        os.fsync(f.fileno())


def words(n: int, seed: int) -> str:
    """Text for the word-level test tokenizer: a random walk over t0..t127 (some structure)."""
    rng = random.Random(seed)
    t, out = 3, []
    for _ in range(n):
        t = (t + rng.choice((1, 1, 2, 5, -3, 17))) % VOCAB
        out.append(f"t{t}")
    return " ".join(out)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("text")
    (d / "calib.txt").write_text(words(1500, 0))
    (d / "eval.txt").write_text(words(200, 1))
    return d / "calib.txt", d / "eval.txt"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("store") / "tiny.llmflash")


@pytest.fixture
def store(pristine, tmp_path) -> Path:
    dst = tmp_path / "s.llmflash"
    shutil.copytree(pristine, dst)
    return dst
