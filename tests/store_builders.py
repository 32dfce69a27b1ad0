"""Builders of tiny llmflash stores and files for the tests: random-weight stores written by the
real StoreWriter, manifest edits that keep the checksums consistent, permuted neuron orders,
trained predictors, and the command lines of the calibrate verb."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from llmflash.convert.writer import StoreWriter
from llmflash.models.config import ModelConfig
from llmflash.sparsity.labels import pack_bits
from llmflash.sparsity.lowrank import train_layer
from llmflash.sparsity.predictors_file import save_predictors
from llmflash.store import CHECKSUMMED, PREDICTORS, VERSION, VQ, expected_resident, write_manifest
from llmflash.store.checksums import file_entry


def opt_config(**kw) -> ModelConfig:
    """A plain ReLU FFN with fc1/fc2 biases, like OPT (tiny_config's sizes; `kw` overrides)."""
    base = dict(
        arch="opt",
        gated=False,
        act="relu",
        ffn_bias=True,
        norm="layer",
        attn_bias=True,
        n_kv_heads=[4, 4],
        rope_theta=None,
        learned_pos=True,
        pos_offset=2,
    )
    return tiny_config(**{**base, **kw})


def tiny_config(**kw) -> ModelConfig:
    base = dict(
        arch="llama",
        vocab_size=64,
        dim=32,
        n_layers=2,
        head_dim=8,
        n_heads=[4, 4],
        n_kv_heads=[2, 2],
        ffn_dims=[48, 40],
        max_positions=128,
        eos_token_ids=[1],
    )
    base.update(kw)
    return ModelConfig(**base)


def write_store(
    dst: Path,
    config: ModelConfig | None = None,
    dtype: str = "float32",
    tokenizer: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """A random-weight store of `config` (default tiny_config()); with `tokenizer` (tokenizer.json
    text) and its chat template when given. The tests' one store writer."""
    config = config or tiny_config()
    g = torch.Generator().manual_seed(0)
    with StoreWriter(dst, config, dtype) as w:
        w.write_resident({k: torch.randn(s, generator=g) for k, s in expected_resident(config).items()})
        for i, n in enumerate(config.ffn_dims):
            d = config.dim
            w.write_layer(
                i,
                up=torch.randn(n, d, generator=g),
                down=torch.randn(d, n, generator=g),
                gate=torch.randn(n, d, generator=g),
            )
        if tokenizer is not None:
            w.write_tokenizer(tokenizer, chat_template)
    return dst


def edit_manifest(store: Path, fn) -> None:
    """Apply `fn` to the manifest and write it back with a matching manifest_crc32 (so the
    validation behind the checksum meets the edit)."""
    m = json.loads((store / "manifest.json").read_text())
    fn(m)
    write_manifest(store, m)


def reseal(store: Path) -> Path:
    """Record the store's files as they are now (size and CRC-32 of each, and the manifest's own
    checksum): for tests that change or add a file on purpose to meet the checks behind the
    checksums (or older tools' ways of editing a store)."""
    m = json.loads((store / "manifest.json").read_text())
    if m.get("version") in (VERSION, VQ):
        m["files"] = {n: file_entry(store / n) for n in CHECKSUMMED if (store / n).is_file()}
        if m.get("predictors") is not None and (store / PREDICTORS).is_file():
            m["predictors"]["bytes"] = (store / PREDICTORS).stat().st_size
    write_manifest(store, m)
    return store


def rebuild_crcs(store: Path) -> Path:
    """Recompute every region's and bundle's CRC-32 from ffn.bin as it is now, and reseal: for
    tests of content that is wrong although every checksum matches (a crafted store)."""
    import zlib

    from llmflash.store import crc32_per_bundle

    m = json.loads((store / "manifest.json").read_text())
    data = (store / "ffn.bin").read_bytes()
    crcs = []
    for L in m["layers"]:
        payload = data[L["offset"] : L["offset"] + L["n_neurons"] * L["bundle_bytes"]]
        L["crc32"] = zlib.crc32(payload)
        crcs.append(crc32_per_bundle(payload, L["bundle_bytes"]))
    (store / "bundles.crc32").write_bytes(np.concatenate(crcs).astype("<u4").tobytes())
    write_manifest(store, m)
    return reseal(store)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmflash", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")},
    )


def make_store(
    dst: Path, dtype: str = "float16", dim: int = 576, ffn: tuple[int, ...] = (64, 150, 33), seed: int = 0
) -> Path:
    """A tiny llama store written by the real StoreWriter (bundle = 3 x dim values)."""
    n = len(ffn)
    cfg = ModelConfig(
        arch="llama",
        vocab_size=32,
        dim=dim,
        n_layers=n,
        head_dim=64,
        n_heads=[dim // 64] * n,
        n_kv_heads=[dim // 64] * n,
        ffn_dims=list(ffn),
    )
    g = torch.Generator().manual_seed(seed)
    with StoreWriter(dst, cfg, dtype) as w:
        w.write_resident({k: torch.randn(shape, generator=g) for k, shape in expected_resident(cfg).items()})
        for i, f in enumerate(ffn):
            w.write_layer(
                i,
                up=torch.randn(f, dim, generator=g),
                down=torch.randn(dim, f, generator=g),
                gate=torch.randn(f, dim, generator=g),
            )
    return dst


def permute_store(src: Path, dst: Path, seed: int = 0) -> Path:
    """A copy of `src` that keeps each layer's neurons in a random order (the manifest's `order`:
    bundle j is neuron order[j]), its bundles and resident fc1 biases (OPT) permuted alike; a
    predictors file, in original ids, is copied as is."""
    import json
    import shutil
    import zlib

    from safetensors.torch import load_file, save_file

    from llmflash.store import Store

    shutil.copytree(src, dst)
    s, g = Store(src), torch.Generator().manual_seed(seed)
    m = json.loads((dst / "manifest.json").read_text())
    resident = load_file(str(dst / "resident.safetensors"))
    crcs = []  # bundles.crc32, permuted alike
    with open(dst / "ffn.bin", "r+b") as f:
        for i, L in enumerate(s.layers):
            order = torch.randperm(L.n_neurons, generator=g)
            payload = s.read_layer(i)[order].contiguous().view(torch.uint8).numpy().tobytes()
            f.seek(L.offset)
            f.write(payload)
            m["layers"][i].update(order=order.tolist(), crc32=zlib.crc32(payload))
            crcs.append(s.bundle_crcs(i)[order.numpy()])
            name = f"layers.{i}.ffn.up_bias"
            if name in resident:  # OPT's fc1 bias
                resident[name] = resident[name][order].contiguous()
    save_file(resident, str(dst / "resident.safetensors"), metadata={"format": "llmflash-store"})
    (dst / "manifest.json").write_text(json.dumps(m))
    np.concatenate(crcs).astype("<u4").tofile(dst / "bundles.crc32")
    return reseal(dst)  # the changed files' checksums


def planted(n_tokens: int, D: int, n: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D) with channel scales spread over 300x (like an FFN input's outlier channels) and
    labels from a rank-r function of x: y = (x W1) W2 + b > 0, W1 (D, r), W2 (r, n)."""
    scales = torch.logspace(-1, 1.5, D)[torch.randperm(D, generator=torch.Generator().manual_seed(0))]
    w1 = torch.randn(D, r, generator=torch.Generator().manual_seed(1)) / scales[:, None]
    w2 = torch.randn(r, n, generator=torch.Generator().manual_seed(2))
    b = 0.3 * torch.randn(n, generator=torch.Generator().manual_seed(3))
    x = torch.randn(n_tokens, D, generator=torch.Generator().manual_seed(100 + seed)) * scales
    return x, (x @ w1) @ w2 + b > 0


def write_predictors(path: Path, config: ModelConfig, rank: int = 3, recall: float = 0.9) -> Path:
    results = []
    for i, n in enumerate(config.ffn_dims):
        x, y = planted(600, config.dim, n, 2, seed=i)
        results.append(train_layer(x, pack_bits(y), n, rank=rank, heldout=150, epochs=1, batch=64, seed=i))
    meta = dict(rank=rank, keep=0.5, sparsity=0.5, tokens=600, heldout_tokens=150, epochs=1, seed=0, label="magnitude")
    return save_predictors(path, results, recall, [0.1] * config.n_layers, meta)


def calibrate_args(store: Path, text: Path, *extra: str) -> list[str]:
    return [
        "calibrate",
        str(store),
        "--text",
        str(text),
        "--tokens",
        "1200",
        "--rank",
        "16",
        "--epochs",
        "4",
        "--chunk",
        "100",
        "--batch",
        "64",
        "--quiet",
        *extra,
    ]


def shadow_args(store, text, *extra):
    return [
        "calibrate",
        str(store),
        "--kind",
        "shadow",
        "--text",
        str(text),
        "--tokens",
        "1200",
        "--chunk",
        "100",
        "--quiet",
        *extra,
    ]
