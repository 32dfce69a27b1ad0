"""The price of naive's read check: ms per token of naive's FFN with `verify_reads=True` (every
region's CRC-32, hashed by the reader as each 1 MiB request lands) against the unchecked
baseline `verify_reads=False`, on the same store, in alternating rounds.

    python benches/bench_naive_verify.py                       # the embedded SmolLM2-135M store
    python benches/bench_naive_verify.py --synthetic-layers 4  # + an OPT-6.7B-width store, 4 layers

A token here is one FFN call per layer (read the whole region with direct I/O, then the dense FFN
on it): the part of a naive token the check changes; attention costs the same in both and is
left out. The synthetic store (random float16 with OPT-6.7B's shape: 16,384 ReLU neurons of
16 KiB per layer, 268 MB a region) is written once under bench-out/ and reused. The disk is
shared and moves by tens of percent from second to second, so the modes alternate token by
token and each mode's median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llmflash.store import Store  # noqa: E402
from llmflash.strategies.naive import NaiveFFN  # noqa: E402

SYNTHETIC = HERE.parent / "bench-out" / "opt-width-random.llmflash"


def synthetic_store(layers: int, out: Path = SYNTHETIC) -> Path:
    """An OPT-6.7B-width store of `layers` layers (make_opt_store's writer), made once."""
    import make_opt_store as M

    from llmflash.convert.writer import StoreWriter
    from llmflash.store import RESIDENT

    if out.exists():
        s = Store(out)
        if len(s.layers) == layers:
            return out
    cfg = replace(
        M.opt_6_7b_config(),
        n_layers=layers,
        n_heads=[32] * layers,
        n_kv_heads=[32] * layers,
        ffn_dims=[16384] * layers,
        name=f"OPT-6.7B width, {layers} layers, random (bench_naive_verify)",
    )
    rng = np.random.default_rng(0)
    out.parent.mkdir(parents=True, exist_ok=True)
    with StoreWriter(out, cfg, "float16", source="benches/bench_naive_verify.py random", force=True) as w:
        M.write_resident(w.tmp / RESIDENT, cfg, rng)
        for i in range(layers):
            offset, bb, region = w.regions[i]
            payload = M.random_f16_bits(cfg.ffn_dims[i] * cfg.bundle_values, rng)
            w._ffn.write(memoryview(payload).cast("B"))
            w._ffn.write(b"\0" * (region - payload.nbytes))
            w.record_layer(i, payload)
        w._ffn.flush()
    return out


def token(ffn: NaiveFFN, x: torch.Tensor, n_layers: int) -> tuple[float, float]:
    """One token's FFN over every layer: (wall ms, of which reading ms)."""
    io0 = ffn.io_s
    t0 = time.perf_counter()
    for layer in range(n_layers):
        ffn(layer, x)
    return (time.perf_counter() - t0) * 1e3, (ffn.io_s - io0) * 1e3


def measure(path: Path, tokens: int) -> dict[str, float]:
    store = Store(path)
    n = len(store.layers)
    x = torch.randn(1, store.config.dim, generator=torch.Generator().manual_seed(0))
    modes = {"checked": NaiveFFN(store), "unchecked": NaiveFFN(store, verify_reads=False)}
    for ffn in modes.values():  # warm-up: allocation, first faults
        token(ffn, x, n)
    ms: dict[str, list[float]] = {k: [] for k in modes}
    io: dict[str, list[float]] = {k: [] for k in modes}
    for t in range(tokens):
        order = list(modes) if t % 2 == 0 else list(reversed(modes))
        for name in order:
            wall, read = token(modes[name], x, n)
            ms[name].append(wall)
            io[name].append(read)
    region_mb = sum(L.region_bytes for L in store.layers) / 1e6
    out = {"layers": n, "mb_per_token": region_mb}
    for name in modes:
        out[f"{name}_ms"] = statistics.median(ms[name])
        out[f"{name}_io_ms"] = statistics.median(io[name])
    out["ratio"] = out["checked_ms"] / out["unchecked_ms"]
    out["io_ratio"] = out["checked_io_ms"] / out["unchecked_io_ms"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--store",
        type=Path,
        action="append",
        help="a store to measure (repeatable); default: the embedded SmolLM2-135M",
    )
    ap.add_argument("--synthetic-layers", type=int, default=0, help="also an OPT-6.7B-width store of N layers")
    ap.add_argument("--tokens", type=int, default=12, help="tokens per mode (alternating)")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    stores = list(a.store or [])
    if not stores:
        from llmflash.defaults import store_or_default

        stores.append(Path(store_or_default(None)))
    if a.synthetic_layers:
        stores.append(synthetic_store(a.synthetic_layers))
    print(
        "| store | layers | MB/token | checked ms | unchecked ms | ratio | checked I/O ms | unchecked I/O ms "
        "| I/O ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for path in stores:
        r = measure(path, a.tokens)
        print(
            f"| {path.name} | {r['layers']} | {r['mb_per_token']:.1f} | {r['checked_ms']:.1f} | "
            f"{r['unchecked_ms']:.1f} | {r['ratio']:.3f} | {r['checked_io_ms']:.1f} | "
            f"{r['unchecked_io_ms']:.1f} | {r['io_ratio']:.3f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
