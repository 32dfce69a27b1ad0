"""Flash on a quantized store against llama.cpp when the weights do not fit: llama.cpp (which
mmaps the GGUF) in a memory cgroup of its own overhead plus the weight budget, the GGUF's page
cache dropped first; llmflash `flash` with `--memory` the same budget, its fixed overhead (torch,
buffers) reported beside it. Rounds alternate the two.

    python benches/bench_memory_cap.py STORE --budget 74MB --llama-bench PATH [--threads 1]

STORE: a quantized store of the embedded SmolLM2 (e.g. `llmflash convert GGUF q4_1.llmflash`),
calibrated (`llmflash calibrate STORE --rank 32` fits beside the resident weights). PATH: a
llama-bench built without AMX (an AMX build copies the weights into repacked buffers, which no
cap below the model allows). Needs root and memory control (cgroup v1: a group under this
process's own; v2: under the root) to cap llama.cpp; not part of CI.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import llama_bench

from llmflash.budget import parse_memory
from llmflash.defaults import default_gguf_path

LLAMA_OWN = 25 * 2**20  # llama.cpp's own memory for this model (compute buffers, KV, binary)
NEW_TOKENS = 32
ROUNDS = 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("store", type=Path)
    ap.add_argument("--budget", required=True, help="memory for weights, e.g. 74MB or 0.75x")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--llama-bench", type=Path, required=True)
    a = ap.parse_args()
    gguf = default_gguf_path()
    budget = parse_memory(a.budget, gguf.stat().st_size)
    flash, llama, rss = [], [], 0
    for _ in range(ROUNDS):
        tok_s, peak = _flash(a.store, budget, a.threads)
        rss = max(rss, peak)
        flash.append(tok_s)
        llama.append(_capped_llama(a.llama_bench, gguf, a.threads, LLAMA_OWN + budget))
    f, ll = statistics.median(flash), statistics.median(llama)
    print(f"weights budget {budget / 1e6:.1f} MB ({budget / gguf.stat().st_size:.2f}x the GGUF), {a.threads} thread(s)")
    print(f"llama.cpp, cgroup cap {(LLAMA_OWN + budget) / 2**20:.0f} MiB: {ll:.2f} tok/s (rounds {llama})")
    print(f"llmflash flash --memory {budget}B: {f:.2f} tok/s (rounds {flash}) = {f / ll:.2f}x llama.cpp")
    print(f"llmflash process peak RSS {rss / 2**20:.0f} MiB (torch, Python and buffers beside the budget)")


def _flash(store: Path, budget: int, threads: int) -> tuple[float, int]:
    """Decode tokens/s of flash with calibrated predictors in a fresh process, and its peak RSS
    (the child reports its own ru_maxrss)."""
    code = (
        "import sys, torch; from llmflash.api import FlashModel; torch.set_num_threads(int(sys.argv[3]));"
        "m = FlashModel.open(sys.argv[1], strategy='flash', memory=int(sys.argv[2]), sparsity='predictor');"
        f"m.generate(list(range(100, 116)), 8, stop_at_eos=False); s0 = m.stats();"
        f"m.generate(list(range(200, 216)), {NEW_TOKENS}, stop_at_eos=False); s1 = m.stats();"
        "import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,"
        "(s1['tokens_out'] - s0['tokens_out']) / (s1['decode_s'] - s0['decode_s']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store), str(budget), str(threads)], check=True, capture_output=True, text=True
    )
    rss, tok_s = out.stdout.split()[-2:]
    return float(tok_s), int(rss)


def _drop_cache(path: Path) -> None:
    """Evict the file's clean pages from the page cache (POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _cgroup(limit: int) -> Path:
    """A fresh memory cgroup under this process's own (v1 or v2) with `limit` bytes."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(","):
            group = Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "llmflash-bench"
            group.mkdir(exist_ok=True)
            (group / "memory.limit_in_bytes").write_text(str(limit))
            return group
    group = Path("/sys/fs/cgroup") / "llmflash-bench"  # cgroup v2
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(str(limit))
    return group


def _capped_llama(binary: Path, gguf: Path, threads: int, limit: int) -> float:
    """llama-bench's generation tokens/s inside a memory cgroup of `limit` bytes, cache dropped."""
    _drop_cache(gguf)
    group = _cgroup(limit)
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(NEW_TOKENS), "-r", "1", "-o", "json"]
    done = subprocess.run(
        ["sh", "-c", f'echo $$ > {group / "cgroup.procs"} && exec "$@"', "sh", *cmd],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(
            f"llama-bench under {limit / 2**20:.0f} MiB failed ({done.returncode}): {done.stderr[-400:]}"
        )
    return llama_bench.parse(done.stdout)["tg"]


if __name__ == "__main__":
    main()
