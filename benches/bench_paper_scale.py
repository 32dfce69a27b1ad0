"""The paper's regime at the paper's scale: OPT-6.7B-shaped store (13.3 GB, random float16),
wanted sets with the paper's OPT statistics (10% wanted, 2.4% new per token with a window of 5),
memory = 50% of the model: per-token latency of naive vs flash, interleaved in one run.

    python benches/make_opt_store.py                       # once: 13.3 GB under /work/bench-data
    python benches/bench_paper_scale.py --json bench-out/paper-scale.json --plot bench-out/paper-scale.png

A token here is a whole decoder token of OPT-6.7B's shape: per layer LayerNorm, the q/k/v
projection (one fused 12288x4096 float16 matrix-vector product: the same bytes as q, k and v),
attention over a KV cache of `--context` positions (plus the token's own, written in place), the
4096x4096 output projection, LayerNorm,
then the FFN strategy on that input, with the replayed wanted set. The 32 layers' attention
weights (4.3 GB) are random matrices held in DRAM, generated here (not read from the store's
resident file, to leave the disk to the FFN); the embedding lookup and LM head are left out
(one row, and one 50272x4096 product = 0.4 GB, the same for every strategy).

Strategies (token by token, interleaved: the disk is shared and throttled):
  naive     NaiveFFN: each layer's whole region (268 MB) read with 1 MiB direct reads, dense FFN
  flash     FlashFFN(memory = 50% of the real model, window 5, the replay source)
  flash-ahead                 + an exact next-layer lookahead (LookaheadReplay)
  --wanted: flash-wanted, flash-ahead-wanted   the FFN on the wanted rows only (compute="wanted")
  --guess R P: flash-early-R/P, flash-early-exact  the layer's set guessed before its attention
            with recall R and precision P (GuessReplay; repeatable), checked at the FFN; and an
            exact guess
  --floor: floor   flash-wanted replaying one token's sets every token: nothing is read after the
            first, so its token is the compute a flash token cannot go below; with it the run prints
            its bounds on x naive (I/O alone at fio's rates, the floor, perfect overlap, CPU)
  --moves: flash-moves, flash-wanted-moves   the paper's DRAM scheme (fill_holes=False): holes
            closed by moves before the reads start, new neurons appended
  --uring [--uring-depth N]: flash-uring, flash-wanted-uring, flash-ahead-uring   every batch on
            io_uring with N reads in flight (the others: --engine, FlashFFN's default io_uring at
            128; `--engine auto` for the pread pool)
--device cuda: every strategy computes on the GPU (attention weights and KV caches there, flash's
caches in GPU memory under the same 50% budget, naive's regions sent up each token); the kernel
microbenchmark, CPU code, is skipped.
The strategies' order rotates from round to round (the disk is a token bucket: a fixed order
would hand the first strategy the disk that naive and fio had just drained).
Both FFNs decode with the library's own kernel (strategies.base.rows_ffn: one native F16C + FMA
pass per float16 bundle, down rows skipped where relu gives 0). A short in-run microbenchmark
compares it with the torch path (strategies.base.bundle_ffn) on the caches' real rows. fio
(`fio-randread`, 32 threads, 2 s) at 1 MiB and at flash's mean request size runs after every naive
token: the disk's reference and throttle check from the same minute.
Columns: I/O is time the token waited for reads, including the per-bundle CRC-32 checks (a
version-3 store: each bundle checked as it lands) when it waited for them; (crc) is all CRC time,
on the critical path or not; mgmt is memory management without the checks (evictions, moves,
index updates, staging copies).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_opt_store import DEFAULT_OUT, random_f16_bits  # noqa: E402
from paper_scale_report import bounds, plot, print_table, summarize  # noqa: E402
from wanted_sets import GuessReplay, LookaheadReplay, Params, Replay, generate, stats  # noqa: E402

from llmflash.device import resolve_device, synchronize  # noqa: E402
from llmflash.models.layers import decode_attention, linear  # noqa: E402
from llmflash.store import Store, split_bundles  # noqa: E402
from llmflash.strategies.base import bundle_ffn, rows_ffn  # noqa: E402
from llmflash.strategies.flash import FlashFFN, model_bytes  # noqa: E402
from llmflash.strategies.naive import NaiveFFN  # noqa: E402
from llmflash.threads import decode_threads, native_decode  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIO = Path(os.environ.get("LLMFLASH_FIO", REPO.parent / "shared" / "tools" / "fio-randread"))


# -- the rest of a token: attention of the real shape ---------------------------------------------
class Attention:
    """Per layer: LayerNorm, fused qkv (3D, D) and o (D, D) float16 weights with float32 biases,
    attention of one query over a fixed KV cache of `context` positions, kept in float16 and
    read as stored (layers.decode_attention), as the library's Transformer decodes."""

    def __init__(self, n_layers: int, dim: int, n_heads: int, context: int, seed: int, device: torch.device):
        rng = np.random.default_rng([seed, 99])
        self.dim, self.h, self.hd = dim, n_heads, dim // n_heads
        mk = lambda *s: torch.from_numpy(random_f16_bits(math.prod(s), rng)).view(torch.float16).view(*s)  # noqa: E731
        self.qkv = [mk(3 * dim, dim) for _ in range(n_layers)]
        self.o = [mk(dim, dim) for _ in range(n_layers)]
        self.b_qkv = [mk(3 * dim).float() for _ in range(n_layers)]
        self.b_o = [mk(dim).float() for _ in range(n_layers)]
        g = torch.Generator().manual_seed(seed)
        # KV caches of context + 1 positions; each token writes its k, v into the last one in
        # place (a decoder appends to a preallocated cache; concatenating copied 270 MB a token)
        self.k = [torch.randn(n_heads, context + 1, self.hd, generator=g).half() for _ in range(n_layers)]
        self.v = [torch.randn(n_heads, context + 1, self.hd, generator=g).half() for _ in range(n_layers)]
        self.ln_w, self.ln_b = torch.ones(dim), torch.zeros(dim)
        self.device = device
        if device.type != "cpu":
            for name in ("qkv", "o", "b_qkv", "b_o", "k", "v"):
                setattr(self, name, [t.to(device) for t in getattr(self, name)])
            self.ln_w, self.ln_b = self.ln_w.to(device), self.ln_b.to(device)
        self.s = 0.0

    @property
    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.qkv, *self.o))

    def ln(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,), self.ln_w, self.ln_b, 1e-5)

    def __call__(self, i: int, x: Tensor) -> Tensor:
        """x (1, D) float32 -> attention output (1, D) float32."""
        t0 = time.perf_counter()
        h = self.ln(x).half()
        q, k, v = linear(h, self.qkv[i], self.b_qkv[i]).view(3, self.h, 1, self.hd)
        keys, vals = self.k[i], self.v[i]  # (H, ctx+1, hd)
        keys[:, -1:] = k
        vals[:, -1:] = v
        a = decode_attention(q, keys, vals, keys.shape[1])  # (1, D)
        out = linear(a.half(), self.o[i], self.b_o[i])
        synchronize(self.device)  # on a GPU: its run time, not its launch
        self.s += time.perf_counter() - t0
        return out


def decode_token(attn: Attention, ffn, x: Tensor, n_layers: int) -> Tensor:
    """One token through every layer, with the library's decode threading (llmflash.threads:
    torch on one thread, the native float16 kernels on two), as Transformer.forward runs it."""
    early = getattr(ffn, "early", None)  # FlashFFN lookahead="attention"
    with decode_threads(native_decode(attn.dim, torch.float16)):
        for i in range(n_layers):
            if early is not None:
                early(i, attn.ln(x).half())
            x = x + attn(i, x)
            x = x + ffn(i, attn.ln(x).half())
    return x


# -- fio ------------------------------------------------------------------------------------------
def fio(path: Path, bs: int, seconds: int = 2, threads: int = 32) -> tuple[float, float]:
    """(MB/s, CPU microseconds per read): fio-randread's throughput, and the machine's busy CPU
    time over the run (/proc/stat: user, system, irq, softirq, both cores) per request it made.
    The CPU figure includes fio's and the wrapper's own start (an upper bound by a few percent):
    on these VMs a direct read costs ~10 us of kernel time (submission, virtio, completion), so
    a token's ~12,500 16 KiB reads take CPU from the compute they overlap."""
    if not FIO.is_file():
        _fio_unavailable(f"{FIO} does not exist (set LLMFLASH_FIO)")
        return float("nan"), float("nan")
    c0 = busy_seconds()
    r = subprocess.run([str(FIO), str(path), str(bs), str(threads), str(seconds)], capture_output=True, text=True)
    c1 = busy_seconds()
    try:
        mb_s, iops = float(r.stdout.split()[0]), float(r.stdout.split()[2])
    except (IndexError, ValueError):
        _fio_unavailable(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit code {r.returncode}")
        return float("nan"), float("nan")
    reads = iops * seconds
    cpu_us = (c1 - c0) * 1e6 / reads if reads > 0 else float("nan")
    return mb_s, cpu_us


_FIO_WARNED: list[str] = []


def _fio_unavailable(why: str) -> None:
    """Say once why the fio columns and the bounds will be empty (nan)."""
    if not _FIO_WARNED:
        _FIO_WARNED.append(why)
        print(f"fio reference unavailable: {why}; the fio columns and bounds stay empty", file=sys.stderr)


def busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq), or NaN."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        return sum(int(f[i]) for i in (1, 2, 3, 6, 7)) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


# -- the run -------------------------------------------------------------------------------------
KEYS = (
    "ffn_io_s",
    "mgmt_s",
    "crc_s",
    "predict_s",
    "ffn_compute_s",
    "bytes_read",
    "bytes_useful",
    "requests",
    "hits",
    "misses",
    "evicted_window",
    "evicted_capacity",
    "overflow",
    "io_ns",
    "wait_ns",
    "mgmt_ns",
    "ahead_read",
    "ahead_missed",
    "guess_named",
    "guess_right",
    "wanted_named",
)


def snapshot(ffn) -> dict[str, float]:
    s = ffn.stats()
    return {k: float(s.get(k, 0.0)) for k in KEYS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--memory", type=float, default=0.5, help="budget as a share of the real model (0.5)")
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24, help="measured flash tokens per flash strategy")
    ap.add_argument("--naive-tokens", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=8, help="flash tokens before measuring (window fill)")
    ap.add_argument("--context", type=int, default=256, help="KV cache length for attention")
    ap.add_argument(
        "--uring",
        action="store_true",
        help="add flash-uring and flash-ahead-uring (and flash-wanted-uring with --wanted): every "
        "batch on io_uring (no pread pool)",
    )
    ap.add_argument(
        "--uring-depth",
        type=int,
        default=None,
        help="reads in flight for the --uring strategies (default: --concurrency)",
    )
    ap.add_argument(
        "--wanted",
        action="store_true",
        help="add flash-wanted and flash-ahead-wanted: the FFN on the wanted rows only "
        "(FlashFFN compute='wanted'), not every live row",
    )
    ap.add_argument(
        "--guess",
        type=float,
        nargs=2,
        metavar=("RECALL", "PRECISION"),
        action="append",
        help="add flash-early-R/P (the layer's set guessed before its attention with this recall "
        "and precision, checked at the FFN; lookahead='attention'; repeatable) and "
        "flash-early-exact",
    )
    ap.add_argument(
        "--floor",
        action="store_true",
        help="add floor: flash-wanted replaying one token's sets every token (nothing read after "
        "the first), the token's compute with free I/O; and print the run's bounds on x naive",
    )
    ap.add_argument(
        "--moves",
        action="store_true",
        help="add flash-moves (and flash-wanted-moves with --wanted): the paper's DRAM scheme, every "
        "hole closed by moving the last live row in before the reads start (FlashFFN "
        "fill_holes=False), against new neurons read into the holes (the default)",
    )
    ap.add_argument(
        "--concurrency", type=int, default=None, help="reads in flight per fill (FlashFFN's default: 128 on io_uring)"
    )
    ap.add_argument(
        "--engine", default=None, help="the flash strategies' reader engine (FlashFFN's default: io_uring, else auto)"
    )
    ap.add_argument(
        "--no-lookahead",
        dest="lookahead",
        action="store_false",
        help="skip the flash-ahead strategy (layer+1's reads start during layer)",
    )
    ap.add_argument("--device", default="cpu", help="where the math runs: cpu (default), cuda, cuda:N")
    ap.add_argument("--fio-seconds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    a = ap.parse_args(argv)
    from tqdm import tqdm

    torch.set_grad_enabled(False)
    dev = resolve_device(a.device)
    store = Store(a.store)
    cfg = store.config
    resident_b, ffn_b = model_bytes(store)
    real_model = resident_b + ffn_b
    budget = int(a.memory * real_model)
    print(
        f"model {real_model / 1e9:.3f} GB (resident {resident_b / 1e9:.3f} + FFN {ffn_b / 1e9:.3f}); "
        f"memory {a.memory:.0%} = {budget / 1e9:.3f} GB",
        file=sys.stderr,
    )

    t0 = time.perf_counter()
    P = Params(n_layers=cfg.n_layers, n_neurons=cfg.ffn_dims[0], window=a.window, seed=a.seed)
    sets = generate(P, a.warmup + a.tokens)

    def flash(source, **kw) -> FlashFFN:
        kw.setdefault("concurrency", a.concurrency)
        kw.setdefault("engine", a.engine)
        return FlashFFN(store, memory=budget, window=a.window, sparsity=source, device=dev, **kw)

    strategies: dict[str, FlashFFN] = {"flash": flash(Replay(sets))}
    if a.lookahead:
        strategies["flash-ahead"] = flash(LookaheadReplay(sets))
    if a.uring:
        depth = {"engine": "io_uring", "concurrency": a.uring_depth or a.concurrency or 32}
        strategies["flash-uring"] = flash(Replay(sets), **depth)
        if a.wanted:
            strategies["flash-wanted-uring"] = flash(Replay(sets), compute="wanted", **depth)
        strategies["flash-ahead-uring"] = flash(LookaheadReplay(sets), **depth)
    for r, p in a.guess or []:
        strategies[f"flash-early-{r:g}/{p:g}"] = flash(
            GuessReplay(sets, P.n_neurons, r, p, seed=a.seed), compute="wanted", lookahead="attention"
        )
    if a.guess:
        strategies["flash-early-exact"] = flash(GuessReplay(sets, P.n_neurons), compute="wanted", lookahead="attention")
    if a.floor:
        # the compute floor: one token's sets replayed every token, so after the first admission
        # nothing is read; a flash token with free and perfectly hidden I/O (compute="wanted")
        strategies["floor"] = flash(Replay([sets[a.warmup]] * len(sets)), compute="wanted")
    if a.moves:
        strategies["flash-moves"] = flash(Replay(sets), fill_holes=False)
    if a.wanted:
        strategies["flash-wanted"] = flash(Replay(sets), compute="wanted")
        if a.moves:
            strategies["flash-wanted-moves"] = flash(Replay(sets), compute="wanted", fill_holes=False)
        if a.lookahead:
            strategies["flash-ahead-wanted"] = flash(LookaheadReplay(sets), compute="wanted")
    cap = strategies["flash"].plan.capacities[0]
    gen = stats(sets, P.n_neurons, a.window, capacity=cap, skip=a.warmup)
    print("generator (measured tokens): " + ", ".join(f"{k} {v:.4f}" for k, v in gen.items()), file=sys.stderr)
    naive = NaiveFFN(store, device=dev)
    attn = Attention(cfg.n_layers, cfg.dim, cfg.n_heads[0], a.context, a.seed, dev)
    print(
        f"setup {time.perf_counter() - t0:.0f} s: caches {cap} neurons/layer "
        f"({cap / P.n_neurons:.1%} of the FFN), attention weights {attn.weight_bytes / 1e9:.2f} GB in DRAM",
        file=sys.stderr,
    )

    g = torch.Generator().manual_seed(a.seed + 1)
    xs = [torch.randn(1, cfg.dim, generator=g).to(dev) for _ in range(a.warmup + a.tokens + a.naive_tokens)]
    for t in tqdm(range(a.warmup), desc="warm-up (window fill)", unit="tok"):
        for f in strategies.values():
            decode_token(attn, f, xs[t], cfg.n_layers)
    # naive's first token also checks every region's CRC (strategies.naive): untimed, like the fill
    decode_token(attn, naive, xs[0], cfg.n_layers)

    records: dict[str, list[dict[str, float]]] = {name: [] for name in [*strategies, "naive"]}
    fio_runs: list[dict[str, float]] = []

    def timed(name: str, f, x: Tensor) -> None:
        before, att0, c0 = snapshot(f), attn.s, busy_seconds()
        t0 = time.perf_counter()
        decode_token(attn, f, x, cfg.n_layers)
        synchronize(dev)
        wall = time.perf_counter() - t0
        d = {k: v - before[k] for k, v in snapshot(f).items()}
        d.update(wall_s=wall, attn_s=attn.s - att0, cpu_s=busy_seconds() - c0)
        records[name].append(d)

    per_round = max(1, a.tokens // max(1, a.naive_tokens))
    schedule = []
    for t in range(a.tokens):
        schedule.append(("flash", a.warmup + t))
        if (t + 1) % per_round == 0 and len([s for s in schedule if s[0] == "naive"]) < a.naive_tokens:
            schedule += [("naive", a.warmup + a.tokens + len([s for s in schedule if s[0] == "naive"])), ("fio", 0)]
    names = list(strategies)
    for step, (kind, t) in enumerate(tqdm(schedule, desc="flash / naive / fio, interleaved", unit="step")):
        if kind == "flash":
            # Rotate the order each round: the disk is a token bucket, and a fixed order would
            # always hand the same strategy the disk that naive and fio had just drained.
            k = step % len(names)
            for name in names[k:] + names[:k]:
                timed(name, strategies[name], xs[t])
        elif kind == "naive":
            timed("naive", naive, xs[t])
        else:
            fr = records["flash"][-per_round:]
            mean_req = sum(r["bytes_read"] for r in fr) / max(1.0, sum(r["requests"] for r in fr))
            bs = max(4096, int(round(mean_req / 4096)) * 4096)
            mb_1m, _ = fio(store.ffn_path, 1 << 20, a.fio_seconds)
            mb_bs, cpu_bs = fio(store.ffn_path, bs, a.fio_seconds)
            fio_runs.append(
                {"mb_s_1m": mb_1m, "bs_flash": bs, "mb_s_flash_bs": mb_bs, "cpu_us_per_read_flash_bs": cpu_bs}
            )

    micro = kernel_micro(strategies["flash"], naive, cfg) if dev.type == "cpu" else {}
    rows = summarize(records, fio_runs, ffn_b, cfg)
    out = {
        "store": str(a.store),
        "model_bytes": real_model,
        "resident_bytes": resident_b,
        "ffn_bytes": ffn_b,
        "budget_bytes": budget,
        "capacity_neurons_per_layer": cap,
        "capacity_share": cap / P.n_neurons,
        "context": a.context,
        "generator": gen,
        "generator_params": {"wanted": P.wanted, "new": P.new, "hot": P.hot, "window": P.window, "rates": P.rates()},
        "rows": rows,
        "fio": fio_runs,
        "kernel_micro_ms": micro,
        "records": records,
        "threads": torch.get_num_threads(),
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "loadavg": os.getloadavg(),
    }
    out["bounds"] = bounds(rows, fio_runs, ffn_b)
    print_table(out)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    if a.plot:
        plot(rows, a.plot)
    return 0


def kernel_micro(flash: FlashFFN, naive: NaiveFFN, cfg) -> dict[str, float]:
    """ms per layer: the torch path (bundle_ffn, "project") vs the native one-pass decode (rows_ffn,
    "native") on a flash cache's live rows and on naive's last-read whole region, alternated 3
    times, best of each."""
    x = torch.randn(1, cfg.dim).half()
    first = flash.layers[0]
    live = first.cache.live
    b_flash, b_naive = first.bias, naive.b1[-1]
    cases = {
        "flash_live_rows": (
            first.rows[:live],
            None if b_flash is None else b_flash[torch.from_numpy(first.cache.slot_neurons())],
        ),
        "naive_region": (
            naive.bytes_view[: naive.store.layers[-1].payload_bytes].view(torch.float16).view(cfg.ffn_dims[-1], -1),
            b_naive,
        ),
    }
    out: dict[str, float] = {"flash_live_rows_n": float(live)}
    for name, (rows, bias) in cases.items():
        best = {"project": 1e9, "native": 1e9}
        for _ in range(3):
            for k in best:
                t0 = time.perf_counter()
                if k == "project":
                    p = split_bundles(rows, cfg)
                    bundle_ffn(x, p["up"], p["down"], None, bias, cfg.act)
                else:
                    rows_ffn(x, rows, cfg, bias)
                best[k] = min(best[k], (time.perf_counter() - t0) * 1e3)
        out.update({f"{name}_{k}": v for k, v in best.items()})
    return out


if __name__ == "__main__":
    sys.exit(main())
