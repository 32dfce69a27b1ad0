"""A mixture of experts from flash at scale: llmflash's expert caches (`flash`) against reading
every routed expert each token (`naive`) and against transformers + accelerate's disk offload of
the same weights under the same memory cap, in one interleaved run per budget.

    python benches/make_moe_model.py            # once: OUT/hf and OUT/store.llmflash (~14 GB each)
    python benches/bench_moe.py [--memory 0.25x 0.5x] [--tokens 6] [--json bench-out/moe.json]

Per budget (a share of the model's float16 bytes): the runs prefill the same random prompt
(untimed), then take turns decoding one token each, `--tokens` times, fed the same random token
ids (teacher forcing; the next token is not the argmax: a random-weight model's greedy choice
repeats one token, whose routing repeats, which no text does; `--greedy` shows that case). accelerate holds
what fits its `max_memory` cap in DRAM and reads the rest from its offload folder per token; its
files (and the checkpoint's) are dropped from the page cache before each of its tokens
(posix_fadvise DONTNEED), so it reads from the disk as llmflash does (direct I/O). The disk's
own rate is measured in the same run: fio-randread on ffn.bin at 1 MiB (32 threads) and at
flash's mean request size.

Reported per run: ms per token, x naive, x accelerate, MB read per token and the minimum the
routing and the caches imply (the experts that missed), experts read per token, the hit rate,
the distinct experts each layer's router picked over the decoded tokens (how concentrated the
routing is: what bounds any cache), and with --lookahead (layer, attention) the guess's
precision. The weights are random: measure the routing, do not assume it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIO = Path(os.environ.get("LLMFLASH_FIO", REPO.parent / "shared" / "tools" / "fio-randread"))
DEFAULT_DATA = Path("/work/bench-data/olmoe-random")


def drop_cache(folders: list[Path]) -> None:
    """Evict every file under `folders` from the page cache (clean pages; nothing is written)."""
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def fio(path: Path, bs: int, seconds: int = 2) -> float:
    """fio-randread's MB/s on `path` at `bs` bytes, 32 threads (nan without fio)."""
    if not FIO.is_file():
        return float("nan")
    r = subprocess.run([str(FIO), str(path), str(bs), "32", str(seconds)], capture_output=True, text=True)
    try:
        return float(r.stdout.split()[0])
    except (IndexError, ValueError):
        return float("nan")


class Flash:
    """An llmflash run: `strategy` over the store, its own KV cache."""

    def __init__(self, label: str, store: Path, strategy: str, **opts):
        from llmflash import FlashModel

        self.label, self.fm = label, FlashModel.open(store, strategy=strategy, **opts)
        self.cache = None
        self.ms: list[float] = []
        self.totals: dict[str, float] = {}

    def prefill(self, ids: list[int]) -> int:
        m = self.fm.model
        self.cache = m.new_cache(len(ids) + 64)
        with torch.inference_mode():
            tok = int(m.forward(torch.tensor(ids), self.cache)[-1].argmax())
        self.fm.ffn.reset_stats()  # the decoded tokens' figures only (distinct experts too)
        return tok

    def step(self, tok: int) -> int:
        before = self.fm.ffn.stats()
        t0 = time.perf_counter()
        with torch.inference_mode():
            nxt = int(self.fm.model.forward(torch.tensor([tok]), self.cache)[-1].argmax())
        self.ms.append((time.perf_counter() - t0) * 1e3)
        for k, v in self.fm.ffn.stats().items():
            self.totals[k] = self.totals.get(k, 0.0) + v - before.get(k, 0.0)
        return nxt


class Accelerate:
    """transformers' OlmoeForCausalLM with accelerate's device_map: `cap` bytes of weights in
    DRAM, the rest offloaded to a folder and read back per token."""

    def __init__(self, hf: Path, cap: int, offload: Path):
        from transformers import AutoModelForCausalLM

        self.label, self.hf, self.offload = "accelerate", hf, offload
        self.model = AutoModelForCausalLM.from_pretrained(
            hf, dtype=torch.float16, device_map="auto", max_memory={"cpu": cap}, offload_folder=str(offload)
        ).eval()
        self.pkv = None
        self.ms: list[float] = []
        self.totals: dict[str, float] = {}

    def prefill(self, ids: list[int]) -> int:
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())

    def step(self, tok: int) -> int:
        drop_cache([self.offload, self.hf])
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model(torch.tensor([[tok]]), past_key_values=self.pkv, use_cache=True)
        self.ms.append((time.perf_counter() - t0) * 1e3)
        self.pkv = out.past_key_values
        return int(out.logits[0, -1].argmax())


def row(r, tokens: int, base: dict[str, float]) -> dict[str, float | str]:
    ms = float(np.mean(r.ms))
    out: dict[str, float | str] = {"run": r.label, "ms_per_token": ms, "tok_per_s": 1e3 / ms}
    out["x_naive"] = base["naive"] / ms
    if "accelerate" in base:
        out["x_accelerate"] = base["accelerate"] / ms
    t = r.totals
    if "bytes_read" in t:
        out.update(
            mb_read_per_token=t["bytes_read"] / tokens / 1e6,
            mb_min_per_token=t.get("bytes_useful", 0.0) / tokens / 1e6,
            read_vs_min=t["bytes_read"] / max(t.get("bytes_useful", 0.0), 1.0),
            experts_read_per_token=(t.get("misses", 0.0) + t.get("overflow", 0.0)) / tokens,
            hit_rate=t.get("hits", 0.0) / max(t.get("hits", 0.0) + t.get("misses", 0.0) + t.get("overflow", 0.0), 1),
            io_ms=t.get("ffn_io_s", 0.0) * 1e3 / tokens,
            compute_ms=t.get("ffn_compute_s", 0.0) * 1e3 / tokens,
            disk_mb_s=t["bytes_read"] / max(t.get("ffn_io_s", 0.0), 1e-9) / 1e6,
            requests_per_token=t.get("requests", 0.0) / tokens,
            kb_per_request=t["bytes_read"] / max(t.get("requests", 0.0), 1.0) / 1e3,
        )
        out["distinct_experts_per_layer"] = r.fm.ffn.stats()["distinct_experts_per_layer"]
        if t.get("guess_named"):
            out["guess_precision"] = t["guess_right"] / t["guess_named"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--memory", nargs="+", default=["0.25x", "0.5x"])
    ap.add_argument("--tokens", type=int, default=6)
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--window", type=int, default=4)
    ap.add_argument(
        "--lookahead", nargs="*", default=[], choices=["layer", "attention"], help="also flash runs with lookahead"
    )
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--greedy", action="store_true", help="feed each run its own argmax instead of random ids")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from llmflash.budget import parse_memory
    from llmflash.store import Store
    from llmflash.strategies.flash import model_bytes

    store, hf = a.data / "store.llmflash", a.data / "hf"
    s = Store(store)
    total = sum(model_bytes(s))
    gen = np.random.default_rng(0)
    ids = [int(x) for x in gen.integers(0, s.config.vocab_size, a.prompt)]
    forced = [int(x) for x in gen.integers(0, s.config.vocab_size, a.tokens + 1)]
    report = {"store": str(store), "model_bytes": total, "tokens": a.tokens, "budgets": []}
    for mem in a.memory:
        cap = parse_memory(mem, total)
        runs = [Flash("naive", store, "naive"), Flash(f"flash {mem}", store, "flash", memory=mem, window=a.window)]
        for mode in a.lookahead:
            runs.append(Flash(f"flash+{mode} {mem}", store, "flash", memory=mem, window=a.window, lookahead=mode))
        tmp = None
        if not a.no_accelerate:
            tmp = tempfile.TemporaryDirectory(dir=a.data, prefix="offload-")
            t0 = time.perf_counter()
            runs.append(Accelerate(hf, cap, Path(tmp.name)))
            print(f"accelerate loaded in {time.perf_counter() - t0:.0f} s (cap {cap / 1e9:.2f} GB)", flush=True)
        toks = [r.prefill(ids) for r in runs]
        toks = toks if a.greedy else [forced[0]] * len(runs)
        print(f"{mem}: prefilled {len(runs)} runs; first tokens {toks}", flush=True)
        for t in range(a.tokens):
            nxt = [r.step(k) for r, k in zip(runs, toks)]
            toks = nxt if a.greedy else [forced[t + 1]] * len(runs)
            print(f"  token {t + 1}: " + ", ".join(f"{r.label} {r.ms[-1]:.0f} ms" for r in runs), flush=True)
        base = {"naive": float(np.mean(runs[0].ms))}
        if not a.no_accelerate:
            base["accelerate"] = float(np.mean(runs[-1].ms))
        rows = [row(r, a.tokens, base) for r in runs]
        flash = rows[1]
        fio_1m = fio(store / "ffn.bin", 1 << 20)
        kb = int(flash.get("kb_per_request", 1024.0) * 1e3) // 4096 * 4096 or 4096
        fio_req = fio(store / "ffn.bin", kb)
        report["budgets"].append(
            {"memory": mem, "cap_bytes": cap, "rows": rows, "fio_1m_mb_s": fio_1m, "fio_req_mb_s": fio_req}
        )
        print(
            f"\n{mem} of {total / 1e9:.2f} GB (cap {cap / 1e9:.2f} GB); fio 1 MiB {fio_1m:.0f} MB/s, "
            f"{kb // 1024} KiB {fio_req:.0f} MB/s"
        )
        keys = [
            "ms_per_token",
            "x_naive",
            "x_accelerate",
            "mb_read_per_token",
            "mb_min_per_token",
            "read_vs_min",
            "experts_read_per_token",
            "hit_rate",
            "distinct_experts_per_layer",
            "disk_mb_s",
            "guess_precision",
        ]
        print(f"{'run':22s}" + "".join(f"{k[:14]:>15s}" for k in keys))
        for r in rows:
            cells = "".join(f"{r[k]:15.2f}" if isinstance(r.get(k), float) else f"{'-':>15s}" for k in keys)
            print(f"{r['run']:22s}{cells}")
        del runs
        if tmp is not None:
            tmp.cleanup()
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
