"""Write a synthetic ffn.bin for the I/O benchmarks: >= 2 GiB of incompressible bytes on the
real disk (not a tmpfs, not the page cache: the benchmark reads it with O_DIRECT).

    python benches/make_synthetic_store.py [--out bench-out/ffn.bin] [--gib 2]

The file has no manifest: bench_io.py tiles it with layer regions of whatever bundle size it
measures (1536 bundles of 3,456 bytes: SmolLM2-135M in float16; 16,384 bundles of 16 KiB:
OPT-6.7B's width in float16, the paper's scale). Existing files of the right size are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench-out" / "ffn.bin"


def make(path: Path, size: int) -> Path:
    if path.is_file() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    chunk = bytearray(os.urandom(64 << 20))
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        for i in range(0, size, len(chunk)):
            chunk[:8] = i.to_bytes(8, "little")  # no two chunks identical
            f.write(memoryview(chunk)[: min(len(chunk), size - i)])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dt = time.perf_counter() - t0
    print(f"wrote {size / 2**30:.2f} GiB to {path} in {dt:.1f} s ({size / dt / 1e6:.0f} MB/s)", file=sys.stderr)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args(argv)
    make(args.out, int(args.gib * 2**30) // 4096 * 4096)
    return 0


if __name__ == "__main__":
    sys.exit(main())
