"""`llmflash profile-disk [PATH]`: measure this disk's random-read throughput by request size
and requests in flight (the paper's Figure 2), save it as the planner's cost profile, and plot it.

The scratch file is written with real (non-zero) data on PATH's filesystem, so reads reach the
device, and is removed afterwards. Reads use O_DIRECT (no page cache), like the engine's.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from .._native import Profile, measure_point
from .args import Parser

HELP = "measure random direct-I/O read throughput (the paper's Figure 2)"

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]
CONCURRENCIES = [1, 4, 8, 16, 32]


def _fmt_size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def format_table(profile: Profile) -> str:
    """MB/s by request size (rows) and requests in flight (columns)."""
    head = "request   " + "".join(f"{c:>9}" for c in profile.concurrencies)
    lines = [f"MB/s by requests in flight ({profile.source})", head]
    for s, row in zip(profile.sizes, profile.mbps):
        lines.append(f"{_fmt_size(s):<10}" + "".join(f"{v:>9.0f}" for v in row))
    return "\n".join(lines)


def plot(profile: Profile, out: str | os.PathLike[str]) -> None:
    """MB/s vs request size, one line per concurrency (the paper's Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    kib = [s / 1024 for s in profile.sizes]
    for j, c in enumerate(profile.concurrencies):
        ax.plot(kib, [row[j] for row in profile.mbps], marker="o", label=f"{c} in flight")
    ax.set_xscale("log", base=2)
    ax.set_xticks(kib, [_fmt_size(s) for s in profile.sizes])
    ax.set_xlabel("request size")
    ax.set_ylabel("random read throughput (MB/s)")
    ax.set_title("Random direct-I/O reads (cf. LLM in a flash, Fig. 2)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _write_scratch(path: Path, size: int) -> None:
    # Random-looking data (a 16 MiB random block repeated, each copy salted), fsynced: zeros or a
    # sparse file would be served without touching the device.
    chunk = bytearray(os.urandom(16 << 20))
    with open(path, "wb") as f:
        written, i = 0, 0
        while written < size:
            chunk[:8] = i.to_bytes(8, "little")
            n = min(len(chunk), size - written)
            f.write(memoryview(chunk)[:n])
            written, i = written + n, i + 1
        f.flush()
        os.fsync(f.fileno())


def main(argv: list[str] | None = None) -> int:
    from ..io import default_profile_path

    ap = Parser(prog="llmflash profile-disk", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=".", help="a folder on the disk to measure (default: .)")
    ap.add_argument("--out", default=None, help=f"profile JSON (default: {default_profile_path()})")
    ap.add_argument("--plot", default=None, help="write the Figure-2-style PNG here")
    ap.add_argument("--seconds", type=float, default=1.0, help="seconds per point (default: 1)")
    ap.add_argument("--size-mb", type=int, default=1024, help="scratch file size in MB (default: 1024)")
    args = ap.parse_args(argv)
    folder = Path(args.path)
    if not folder.is_dir():
        print(f"llmflash profile-disk: {folder} is not a folder", file=sys.stderr)
        return 2
    size = args.size_mb << 20
    if size < SIZES[-1] * 4:
        print(f"llmflash profile-disk: --size-mb must be at least {SIZES[-1] * 4 >> 20}", file=sys.stderr)
        return 2
    profile = _measure(folder, size, args.size_mb, args.seconds)
    print(format_table(profile))
    out = Path(args.out) if args.out else default_profile_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    print(f"profile saved to {out}")
    if args.plot:
        plot(profile, args.plot)
        print(f"plot saved to {args.plot}")
    return 0


def _measure(folder: Path, size: int, size_mb: int, seconds: float) -> Profile:
    """Every (request size, requests in flight) point on a scratch file of `size` bytes in `folder`."""
    from tqdm import tqdm

    fd, name = tempfile.mkstemp(prefix=".llmflash-profile-", dir=folder)
    os.close(fd)
    scratch = Path(name)
    try:
        print(f"writing a {size_mb} MB scratch file in {folder.resolve()} ...", file=sys.stderr)
        _write_scratch(scratch, size)
        points = [(s, c) for s in SIZES for c in CONCURRENCIES]
        mbps = {p: 0.0 for p in points}
        # Interleave the passes (every point once, then again) so a throttled stretch of a
        # shared disk does not land on one request size alone; keep the best of two.
        passes = 2
        with tqdm(total=len(points) * passes, desc="measuring", unit="point") as bar:
            for _ in range(passes):
                for s, c in points:
                    bar.set_postfix_str(f"{_fmt_size(s)} x {c}")
                    mbps[(s, c)] = max(mbps[(s, c)], measure_point(scratch, s, c, seconds / passes))
                    bar.update()
    finally:
        scratch.unlink(missing_ok=True)
    table = [[max(mbps[(s, c)], 1e-3) for c in CONCURRENCIES] for s in SIZES]
    return Profile(SIZES, CONCURRENCIES, table, f"measured on {folder.resolve()} at {time.strftime('%Y-%m-%d %H:%M')}")


if __name__ == "__main__":
    sys.exit(main())
