"""`llmflash bench`: the paper's per-token latency table, naive vs flash, measured in one run.

Every strategy decodes the same teacher-forced text (Python's own documentation, in every
CPython), one token at a time, and the strategies take turns token by token (A B C A B C ...):
the disk here is shared and throttled at times, so only figures measured side by side compare.
Per strategy: ms per token split as the paper does (I/O, memory management, compute, where
prediction, compute: everything else, attention and FFN math), bytes read per token, and for
flash the minimum the wanted sets and cache capacity imply (the missing bundles), as a table,
optionally JSON and a PNG bar chart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .cli_args import Parser
from .errors import InvalidArgumentError, check_int
from .store import Store

BENCH_STRATEGIES = ("dense", "naive", "flash", "flash-serial", "ablation")


def calibration_text(n_chars: int = 200_000, offset: int = 0) -> str:
    """English prose from CPython's bundled documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset:offset + n_chars]


@dataclass
class Run:
    label: str
    strategy: str
    model: Any                      # FlashModel
    cache: Any = None
    ms: list[float] = field(default_factory=list)
    totals: dict[str, float] = field(default_factory=dict)

    def ffn_stats(self) -> dict[str, float]:
        f = self.model.ffn
        return f.stats() if hasattr(f, "stats") else {}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if isinstance(after[k], (int, float))}


def run_bench(store_path: str, memories: list[str], window: int = 4, sparsity: str = "oracle",
              tokens: int = 32, prompt_tokens: int = 16, strategies: tuple[str, ...] = ("naive", "flash"),
              progress: bool = True, hot: float = 0.0) -> list[dict[str, Any]]:
    from tqdm import tqdm

    from .api import FlashModel
    from .sparsity import make_source
    from .strategies.flash import check_window

    unknown = [s for s in strategies if s not in BENCH_STRATEGIES]
    if unknown or not strategies:
        raise InvalidArgumentError(f"bench strategies {','.join(strategies)!r}: "
                                   + (f"unknown {', '.join(map(repr, unknown))}; " if unknown else "none given; ")
                                   + f"choose from {', '.join(BENCH_STRATEGIES)}")
    check_int("bench tokens", tokens, 1)
    check_int("bench prompt_tokens", prompt_tokens, 1)
    window = check_window(window)
    if not memories and any(s in strategies for s in ("flash", "ablation", "flash-serial")):
        raise InvalidArgumentError("bench needs at least one memory budget for the flash strategies")
    store = Store(store_path)
    runs: list[Run] = []
    if "dense" in strategies:
        runs.append(Run("dense", "dense", FlashModel(store, "dense", _make("dense", store))))
    if "naive" in strategies:
        runs.append(Run("naive", "naive", FlashModel(store, "naive", _make("naive", store))))
    if "flash" in strategies:
        source = make_source(sparsity, store, hot=hot)    # shared: the oracle holds full weights once
        for mem in memories:
            ffn = _make("flash", store, memory=mem, window=window, sparsity=source)
            runs.append(Run(f"flash {mem}", "flash", FlashModel(store, "flash", ffn)))
    if "ablation" in strategies:                          # the paper's Table: each technique's share
        source = source if "flash" in strategies else make_source(sparsity, store, hot=hot)
        for mem in memories:
            # predictor only: no cache (every predicted neuron read every token), exact pages;
            # + window: the neuron cache and its window; + coalescing: the planner's bridging and
            # whole-region reads (= the flash row)
            for label, reuse, co in ((f"pred only {mem}", False, False), (f"+window {mem}", True, False),
                                     (f"+coalesce {mem}", True, True)):
                if co and "flash" in strategies:
                    continue                                 # the flash row is this one
                ffn = _make("flash", store, memory=mem, window=window, sparsity=source, coalesce=co, reuse=reuse)
                runs.append(Run(label, "flash", FlashModel(store, "flash", ffn)))
    if "flash-serial" in strategies:                      # no read/compute overlap: what it gains
        source = source if "flash" in strategies else make_source(sparsity, store, hot=hot)
        for mem in memories:
            ffn = _make("flash", store, memory=mem, window=window, sparsity=source, overlap=False)
            runs.append(Run(f"serial {mem}", "flash", FlashModel(store, "flash", ffn)))
    tok = runs[0].model.tokenizer
    text = calibration_text(20_000)
    ids = tok.encode(text).ids if tok is not None else list(range(prompt_tokens + tokens))
    ids = [i % store.config.vocab_size for i in ids[:prompt_tokens + tokens]]
    with torch.inference_mode():
        for r in runs:                                    # prefill (not timed): warms the caches
            r.cache = r.model.model.new_cache(len(ids))
            r.model.model.forward(torch.tensor(ids[:prompt_tokens]), r.cache, last_only=True)
            if hasattr(r.model.ffn, "reset_stats"):
                r.model.ffn.reset_stats()
        bar = tqdm(range(prompt_tokens, len(ids)), desc="bench", unit="tok", disable=not progress)
        for t in bar:
            for r in runs:                                # interleaved: A B C A B C ...
                before = r.ffn_stats()
                t0 = time.perf_counter()
                r.model.model.forward(torch.tensor(ids[t:t + 1]), r.cache, last_only=True)
                r.ms.append((time.perf_counter() - t0) * 1e3)
                for k, v in _delta(r.ffn_stats(), before).items():
                    r.totals[k] = r.totals.get(k, 0.0) + v
    rows = []
    n = len(ids) - prompt_tokens
    naive_ms = None
    for r in runs:
        ms = sum(r.ms) / n
        io = r.totals.get("ffn_io_s", 0.0) * 1e3 / n
        mgmt = r.totals.get("mgmt_s", 0.0) * 1e3 / n
        pred = r.totals.get("predict_s", 0.0) * 1e3 / n
        row = {"strategy": r.label, "ms_per_token": ms, "tok_per_s": 1e3 / ms, "io_ms": io, "mgmt_ms": mgmt,
               "predict_ms": pred, "compute_ms": max(0.0, ms - io - mgmt - pred), "mb_read_per_token": r.totals.get("bytes_read", 0.0) / n / 1e6}
        if "bytes_useful" in r.totals:
            row["mb_min_per_token"] = r.totals["bytes_useful"] / n / 1e6
            row["read_vs_min"] = r.totals["bytes_read"] / max(1.0, r.totals["bytes_useful"])
            row["hit_rate"] = r.totals.get("hits", 0.0) / max(1.0, r.totals.get("hits", 0.0) + r.totals.get("misses", 0.0))
        if r.label == "naive":
            naive_ms = ms
        rows.append(row)
    for row in rows:
        row["x_vs_naive"] = naive_ms / row["ms_per_token"] if naive_ms else float("nan")
    return rows


def _make(name: str, store: Store, **options: Any):
    from .strategies import make_ffn

    return make_ffn(name, store, **options)


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("strategy", "{:<16}"), ("ms_per_token", "{:>9.1f}"), ("io_ms", "{:>8.1f}"), ("mgmt_ms", "{:>8.1f}"),
            ("predict_ms", "{:>10.1f}"), ("compute_ms", "{:>10.1f}"), ("mb_read_per_token", "{:>9.2f}"), ("mb_min_per_token", "{:>8.2f}"),
            ("hit_rate", "{:>6.2f}"), ("x_vs_naive", "{:>8.2f}")]
    heads = ["strategy", "ms/tok", "I/O ms", "mgmt ms", "predict ms", "compute ms", "MB read", "MB min", "hits",
             "x naive"]
    widths = [16, 9, 8, 8, 10, 10, 9, 8, 6, 8]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for r in rows:
        cells = []
        for (k, f), w in zip(cols, widths):
            v = r.get(k)
            cells.append(f.format(v) if v is not None else "-".rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["strategy"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    bottom = [0.0] * len(rows)
    for key, color in (("io_ms", "tab:red"), ("mgmt_ms", "tab:orange"), ("predict_ms", "tab:green"),
                       ("compute_ms", "tab:blue")):
        vals = [r[key] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=key.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("ms per token")
    ax.set_title("Per-token latency (measured in one interleaved run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    p = Parser(prog="llmflash bench", description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--memory", action="append", help="flash memory budget(s), repeatable (default 0.5x, 0.75x, 1x)")
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--sparsity", default="oracle", help="predictor[:RECALL[/STAY]], oracle[:KEEP] or all (default oracle)")
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per strategy (default 32)")
    p.add_argument("--strategies", default="naive,flash",
                   help="comma list of dense, naive, flash, flash-serial (flash without read/compute overlap), "
                        "ablation (per memory: predictor only = no cache and no coalescing, + window, + coalescing)")
    p.add_argument("--hot", type=float, default=0.0, metavar="SHARE",
                   help="pin that share of each layer's neurons in DRAM (predictors only; default 0)")
    p.add_argument("--plot", help="write a PNG bar chart of the breakdown")
    p.add_argument("--json", help="write the table as JSON")
    a = p.parse_args(argv)
    rows = run_bench(a.store, a.memory or ["0.5x", "0.75x", "1x"], a.window, a.sparsity, a.tokens,
                     strategies=tuple(s.strip() for s in a.strategies.split(",") if s.strip()), hot=a.hot)
    print(format_table(rows))
    if a.plot:
        plot(rows, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
