"""What `llmflash bench` measures: per-token latency of the strategies, side by side.

Every strategy decodes the same teacher-forced text (Python's own documentation, in every
CPython), one token at a time, and the strategies take turns token by token (A B C A B C ...):
the disk here is shared and throttled at times, so only figures measured side by side compare.
Per strategy: ms per token split as the paper does (I/O, memory management, compute, where
prediction, compute: everything else, attention and FFN math), bytes read per token, and for
flash the minimum the wanted sets and cache capacity imply (the missing bundles). The table,
JSON and chart: llmflash.commands.bench.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import FlashModel
from ..device import resolve_device, synchronize
from ..errors import InvalidArgumentError, check_int
from ..sparsity import make_source
from ..store import Store
from ..strategies import make_ffn
from ..strategies.flash import check_window
from .texts import calibration_text

BENCH_STRATEGIES = ("dense", "naive", "flash", "flash-serial", "ablation")


@dataclass
class Run:
    label: str
    strategy: str
    model: Any  # FlashModel
    cache: Any = None
    ms: list[float] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def ffn_stats(self) -> dict[str, float]:
        f = self.model.ffn
        return f.stats() if hasattr(f, "stats") else {}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if isinstance(after[k], (int, float))}


def run_bench(
    store_path: str,
    memories: list[str],
    window: int = 4,
    sparsity: str = "oracle",
    tokens: int = 32,
    prompt_tokens: int = 16,
    strategies: tuple[str, ...] = ("naive", "flash"),
    progress: bool = True,
    hot: float = 0.0,
    device: str | torch.device | None = None,
) -> list[dict[str, Any]]:
    """One row per run (a strategy, and for flash a memory budget): ms per token and its parts,
    every strategy computing on `device` (llmflash.device; default the CPU)."""
    unknown = [s for s in strategies if s not in BENCH_STRATEGIES]
    if unknown or not strategies:
        raise InvalidArgumentError(
            f"bench strategies {','.join(strategies)!r}: "
            + (f"unknown {', '.join(map(repr, unknown))}; " if unknown else "none given; ")
            + f"choose from {', '.join(BENCH_STRATEGIES)}"
        )
    check_int("bench tokens", tokens, 1)
    check_int("bench prompt_tokens", prompt_tokens, 1)
    window = check_window(window)
    if not memories and any(s in strategies for s in ("flash", "ablation", "flash-serial")):
        raise InvalidArgumentError("bench needs at least one memory budget for the flash strategies")
    dev = resolve_device(device)
    store = Store(store_path)
    runs = _runs(store, memories, window, sparsity, strategies, hot, dev)
    tok = runs[0].model.tokenizer
    text = calibration_text(20_000)
    ids = tok.encode(text).ids if tok is not None else list(range(prompt_tokens + tokens))
    ids = [i % store.config.vocab_size for i in ids[: prompt_tokens + tokens]]
    _decode(runs, ids, prompt_tokens, progress, dev)
    return _rows(runs, len(ids) - prompt_tokens)


def _runs(
    store: Store,
    memories: list[str],
    window: int,
    sparsity: str,
    strategies: tuple[str, ...],
    hot: float,
    dev: torch.device,
) -> list[Run]:
    runs: list[Run] = []
    source_of = make_source
    if store.config.n_experts:  # the router picks whole experts: no neuron source, no ablation
        if "ablation" in strategies or hot:
            raise InvalidArgumentError(
                "--hot and the ablation rows are neuron-level: not for a mixture-of-experts store", store.path
            )
        source_of = lambda *a, **k: None  # noqa: E731
    if "dense" in strategies:
        runs.append(Run("dense", "dense", FlashModel(store, "dense", make_ffn("dense", store, device=dev), dev)))
    if "naive" in strategies:
        runs.append(Run("naive", "naive", FlashModel(store, "naive", make_ffn("naive", store, device=dev), dev)))
    if "flash" in strategies:
        source = source_of(sparsity, store, hot=hot)  # shared: the oracle holds full weights once
        for mem in memories:
            ffn = make_ffn("flash", store, dev, memory=mem, window=window, **_src(source))
            runs.append(Run(f"flash {mem}", "flash", FlashModel(store, "flash", ffn, dev)))
    if "ablation" in strategies:  # the paper's Table: each technique's share
        source = source if "flash" in strategies else source_of(sparsity, store, hot=hot)
        for mem in memories:
            # predictor only: no cache (every predicted neuron read every token), exact pages;
            # + window: the neuron cache and its window; + coalescing: the planner's bridging and
            # whole-region reads (= the flash row)
            for label, reuse, co in (
                (f"pred only {mem}", False, False),
                (f"+window {mem}", True, False),
                (f"+coalesce {mem}", True, True),
            ):
                if co and "flash" in strategies:
                    continue  # the flash row is this one
                opts = dict(memory=mem, window=window, sparsity=source, coalesce=co, reuse=reuse)
                ffn = make_ffn("flash", store, dev, **opts)
                runs.append(Run(label, "flash", FlashModel(store, "flash", ffn, dev)))
    if "flash-serial" in strategies:  # no read/compute overlap: what it gains
        source = source if "flash" in strategies else source_of(sparsity, store, hot=hot)
        for mem in memories:
            ffn = make_ffn("flash", store, dev, memory=mem, window=window, overlap=False, **_src(source))
            runs.append(Run(f"serial {mem}", "flash", FlashModel(store, "flash", ffn, dev)))
    return runs


def _src(source: Any) -> dict[str, Any]:
    """The sparsity option for flash: none for a mixture-of-experts store (its router decides)."""
    return {} if source is None else {"sparsity": source}


def _decode(runs: list[Run], ids: list[int], prompt_tokens: int, progress: bool, dev: torch.device) -> None:
    """Prefill each run (not timed), then decode token by token, the runs taking turns."""
    from tqdm import tqdm

    with torch.inference_mode():
        for r in runs:  # prefill (not timed): warms the caches
            r.cache = r.model.model.new_cache(len(ids))
            r.model.model.forward(torch.tensor(ids[:prompt_tokens]), r.cache, last_only=True)
            if hasattr(r.model.ffn, "reset_stats"):
                r.model.ffn.reset_stats()
        bar = tqdm(range(prompt_tokens, len(ids)), desc="bench", unit="tok", disable=not progress)
        for t in bar:
            for r in runs:  # interleaved: A B C A B C ...
                before = r.ffn_stats()
                t0 = time.perf_counter()
                r.model.model.forward(torch.tensor(ids[t : t + 1]), r.cache, last_only=True)
                synchronize(dev)
                r.ms.append((time.perf_counter() - t0) * 1e3)
                for k, v in _delta(r.ffn_stats(), before).items():
                    r.totals[k] = r.totals.get(k, 0.0) + v


def _rows(runs: list[Run], n: int) -> list[dict[str, Any]]:
    """Per run, the means over the `n` decoded tokens."""
    rows = []
    naive_ms = None
    for r in runs:
        ms = sum(r.ms) / n
        io = r.totals.get("ffn_io_s", 0.0) * 1e3 / n
        mgmt = r.totals.get("mgmt_s", 0.0) * 1e3 / n
        pred = r.totals.get("predict_s", 0.0) * 1e3 / n
        row = {
            "strategy": r.label,
            "ms_per_token": ms,
            "tok_per_s": 1e3 / ms,
            "io_ms": io,
            "mgmt_ms": mgmt,
            "predict_ms": pred,
            "compute_ms": max(0.0, ms - io - mgmt - pred),
            "mb_read_per_token": r.totals.get("bytes_read", 0.0) / n / 1e6,
        }
        if r.totals.get("requests"):
            row["requests_per_token"] = r.totals["requests"] / n
            row["kb_per_request"] = r.totals.get("bytes_read", 0.0) / r.totals["requests"] / 1e3
        if "bytes_useful" in r.totals:
            hits, misses = r.totals.get("hits", 0.0), r.totals.get("misses", 0.0)
            row["mb_min_per_token"] = r.totals["bytes_useful"] / n / 1e6
            row["read_vs_min"] = r.totals["bytes_read"] / max(1.0, r.totals["bytes_useful"])
            row["hit_rate"] = hits / max(1.0, hits + misses)
        if "experts_read_per_token" in r.totals:  # experts: what overflowed the caches was read too
            read = r.totals.get("misses", 0.0) + r.totals.get("overflow", 0.0)
            row["experts_per_token"] = read / n
            row["hit_rate"] = r.totals.get("hits", 0.0) / max(1.0, r.totals.get("hits", 0.0) + read)
        if r.label == "naive":
            naive_ms = ms
        rows.append(row)
    for row in rows:
        row["x_vs_naive"] = naive_ms / row["ms_per_token"] if naive_ms else float("nan")
    return rows
