"""Write an OPT-6.7B-shaped llmflash store with random weights, at the paper's scale (~13.3 GB).

    python benches/make_opt_store.py [--out /work/bench-data/opt-6.7b-random.llmflash]

Everything has the real OPT-6.7B shape (facebook/opt-6.7b config.json): 32 layers, d = 4096,
32 heads of 128, 16,384 ReLU neurons per layer, vocab 50,272 (tied LM head), 2,048 learned
positions (+2), LayerNorm, q/k/v/o and fc biases, float16:

    ffn.bin                32 x 16,384 bundles of up (4096) + down (4096) values
                           = 16,384 B each (4 pages): 8.59 GB, the part flash streams
    resident.safetensors   embeddings, positions, attention (+ biases), norms, fc1 and fc2
                           biases: 4.73 GB

so `Store` opens it, `FlashFFN(memory="50%")` budgets against the real model size (13.32 GB),
and the model could run whole. Values are random float16 of magnitude 2^-7..2^-6 with random
signs (finite everywhere: the benchmark measures I/O and arithmetic, not text). They are made
from raw 64-bit generator output with the exponent bits fixed, so writing runs at disk speed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from llmflash import store as S
from llmflash.convert.writer import StoreWriter
from llmflash.errors import StoreError
from llmflash.models.config import ModelConfig

DEFAULT_OUT = Path("/work/bench-data/opt-6.7b-random.llmflash")


def opt_6_7b_config() -> ModelConfig:
    """facebook/opt-6.7b's shape, in llmflash's ModelConfig."""
    L = 32
    return ModelConfig(
        arch="opt",
        vocab_size=50272,
        dim=4096,
        n_layers=L,
        head_dim=128,
        n_heads=[32] * L,
        n_kv_heads=[32] * L,
        ffn_dims=[16384] * L,
        norm="layer",
        norm_eps=1e-5,
        act="relu",
        gated=False,
        max_positions=2048,
        rope_theta=None,
        attn_bias=True,
        ffn_bias=True,
        pre_norm=True,
        final_norm=True,
        learned_pos=True,
        pos_offset=2,
        tie_embeddings=True,
        bos_token_id=2,
        eos_token_ids=[2],
        name="OPT-6.7B shape, random float16 weights (benches/make_opt_store.py)",
    )


def random_f16_bits(n: int, rng: np.random.Generator) -> np.ndarray:
    """n random float16 values as uint16 bits: sign random, exponent 2^-7, mantissa random."""
    raw = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]  # 64-bit words, 4 values each
    raw &= 0x83FF  # keep sign + mantissa
    raw |= 0x2000  # exponent 8: |v| in [2^-7, 2^-6)
    return raw


def model_bytes(config: ModelConfig, itemsize: int = 2) -> tuple[int, int]:
    """(resident bytes, FFN bytes) of the real model in the store dtype (no padding)."""
    resident = sum(int(np.prod(s)) for s in S.expected_resident(config).values()) * itemsize
    ffn = sum(config.ffn_dims) * config.bundle_values * itemsize
    return resident, ffn


def write_resident(path: Path, config: ModelConfig, rng: np.random.Generator) -> int:
    """Stream a safetensors file of every canonical resident tensor (F16), one tensor at a time.
    Norm weights are 1, biases random small values."""
    want = S.expected_resident(config)
    header, off = {}, 0
    for name, shape in want.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": S.FORMAT}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    ones = np.full(config.dim, 0x3C00, dtype=np.uint16)  # float16 1.0
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in want.items():
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                f.write(ones.tobytes())
            else:
                for start in range(0, n, 64 << 20):  # 128 MB pieces
                    f.write(random_f16_bits(min(64 << 20, n - start), rng).tobytes())
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def make(out: Path, seed: int = 0, force: bool = False) -> Path:
    cfg = opt_6_7b_config()
    rng = np.random.default_rng(seed)
    res_b, ffn_b = model_bytes(cfg)
    print(
        f"OPT-6.7B shape: resident {res_b / 1e9:.3f} GB + FFN {ffn_b / 1e9:.3f} GB = "
        f"{(res_b + ffn_b) / 1e9:.3f} GB float16 -> {out}",
        file=sys.stderr,
    )
    from tqdm import tqdm

    t0 = time.perf_counter()
    # StoreWriter gives the temporary folder, the manifest and the atomic rename; the bytes are
    # written here directly (its write_layer builds torch tensors: minutes at this size).
    with StoreWriter(out, cfg, "float16", source="benches/make_opt_store.py random", force=force) as w:
        nbytes = write_resident(w.tmp / S.RESIDENT, cfg, rng)
        t1 = time.perf_counter()
        print(f"resident.safetensors: {nbytes / 1e9:.2f} GB in {t1 - t0:.0f} s", file=sys.stderr)
        ffn = w._ffn
        for i in tqdm(range(cfg.n_layers), desc="ffn.bin", unit="layer"):
            offset, bb, region = w.regions[i]
            n = cfg.ffn_dims[i]
            payload = random_f16_bits(n * cfg.bundle_values, rng)
            assert payload.nbytes == n * bb and ffn.tell() == offset
            ffn.write(memoryview(payload).cast("B"))
            ffn.write(b"\0" * (region - payload.nbytes))
            w.record_layer(i, payload)  # the region's and each bundle's CRC-32
        ffn.flush()
        t2 = time.perf_counter()
        print(
            f"ffn.bin: {ffn.tell() / 1e9:.2f} GB in {t2 - t1:.0f} s ({ffn.tell() / (t2 - t1) / 1e6:.0f} MB/s)",
            file=sys.stderr,
        )
    print(f"done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing store")
    a = ap.parse_args(argv)
    if a.out.exists() and not a.force:
        try:
            S.Store(a.out)
        except StoreError as e:  # e.g. a version-1 store (fc1 bias in the bundles)
            raise SystemExit(f"{a.out} exists but does not open ({e}); pass --force to rewrite it") from None
        print(f"{a.out} exists (a valid store); pass --force to rewrite it", file=sys.stderr)
        return 0
    free = shutil.disk_usage(a.out.parent if a.out.parent.exists() else Path("/")).free
    if free < 16e9:
        raise SystemExit(f"only {free / 1e9:.1f} GB free on {a.out.parent}; the store needs 13.3 GB")
    make(a.out, a.seed, a.force)
    S.Store(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
