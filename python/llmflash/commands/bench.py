"""`llmflash bench`: the paper's per-token latency table, naive vs flash, measured in one run.

Every strategy decodes the same teacher-forced text (Python's own documentation, in every
CPython), one token at a time, and the strategies take turns token by token (A B C A B C ...):
the disk here is shared and throttled at times, so only figures measured side by side compare.
Per strategy: ms per token split as the paper does (I/O, memory management, compute, where
prediction, compute: everything else, attention and FFN math), bytes read per token, and for
flash the minimum the wanted sets and cache capacity imply (the missing bundles), the read
requests per token and their mean size (what neuron placement, `llmflash place`, changes), as
a table, optionally JSON and a PNG bar chart.
"""

from __future__ import annotations

import json
from typing import Any

from .args import Parser

HELP = "per-token latency of naive vs flash, measured in one interleaved run"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows of run_bench as a fixed-width table ("-" where a strategy has no such figure)."""
    cols = [
        ("strategy", "{:<16}"),
        ("ms_per_token", "{:>9.1f}"),
        ("io_ms", "{:>8.1f}"),
        ("mgmt_ms", "{:>8.1f}"),
        ("predict_ms", "{:>10.1f}"),
        ("compute_ms", "{:>10.1f}"),
        ("mb_read_per_token", "{:>9.2f}"),
        ("mb_min_per_token", "{:>8.2f}"),
        ("requests_per_token", "{:>8.0f}"),
        ("kb_per_request", "{:>8.1f}"),
        ("hit_rate", "{:>6.2f}"),
        ("x_vs_naive", "{:>8.2f}"),
    ]
    heads = [
        "strategy",
        "ms/tok",
        "I/O ms",
        "mgmt ms",
        "predict ms",
        "compute ms",
        "MB read",
        "MB min",
        "reads",
        "KB/read",
        "hits",
        "x naive",
    ]
    widths = [16, 9, 8, 8, 10, 10, 9, 8, 8, 8, 6, 8]
    if any("experts_per_token" in r for r in rows):  # a mixture of experts: whole experts read per token
        cols.insert(-2, ("experts_per_token", "{:>7.1f}"))
        heads.insert(-2, "experts")
        widths.insert(-2, 7)
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for r in rows:
        cells = []
        for (k, f), w in zip(cols, widths):
            v = r.get(k)
            cells.append(f.format(v) if v is not None else "-".rjust(w))
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: str) -> None:
    """A PNG bar chart of each strategy's ms per token, stacked by I/O, management, prediction, compute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["strategy"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    bottom = [0.0] * len(rows)
    for key, color in (
        ("io_ms", "tab:red"),
        ("mgmt_ms", "tab:orange"),
        ("predict_ms", "tab:green"),
        ("compute_ms", "tab:blue"),
    ):
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
    from .benchmark import run_bench

    p = Parser(prog="llmflash bench", description=__doc__.split("\n\n")[0])
    p.add_argument("store")
    p.add_argument("--memory", action="append", help="flash memory budget(s), repeatable (default 0.5x, 0.75x, 1x)")
    p.add_argument("--window", type=int, default=4)
    p.add_argument(
        "--sparsity", default="oracle", help="predictor[:RECALL[/STAY]], oracle[:KEEP] or all (default oracle)"
    )
    p.add_argument("--tokens", type=int, default=32, help="decoded tokens per strategy (default 32)")
    p.add_argument(
        "--strategies",
        default="naive,flash",
        help="comma list of dense, naive, flash, flash-serial (flash without read/compute overlap), "
        "ablation (per memory: predictor only = no cache and no coalescing, + window, + coalescing)",
    )
    p.add_argument(
        "--hot",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="pin that share of each layer's neurons in DRAM (predictors only; default 0)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where the math runs: cpu (default), cuda, cuda:N or auto (cuda when torch sees one)",
    )
    p.add_argument("--plot", help="write a PNG bar chart of the breakdown")
    p.add_argument("--json", help="write the table as JSON")
    a = p.parse_args(argv)
    rows = run_bench(
        a.store,
        a.memory or ["0.5x", "0.75x", "1x"],
        a.window,
        a.sparsity,
        a.tokens,
        strategies=tuple(s.strip() for s in a.strategies.split(",") if s.strip()),
        hot=a.hot,
        device=a.device,
    )
    print(format_table(rows))
    if a.plot:
        plot(rows, a.plot)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0
