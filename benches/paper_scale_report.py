"""bench_paper_scale.py's results: per-strategy summaries of the recorded tokens (means, medians,
the paper's split into I/O, memory management and compute, ratios to naive), the bounds the disk's
own rate (fio, measured in the same run) sets, the printed table and the bar plot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _finite_mean(values: list[float]) -> float:
    """The mean of the finite values; nan when there is none (fio unavailable), without numpy's warning."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def bounds(rows, fio_runs, ffn_b: int) -> dict[str, float] | None:
    """What this run's disk and compute allow, against naive's measured token: I/O alone (naive's
    measured I/O time over flash's bytes at fio's rate for flash's request size: no compute on
    either side), the floor row (reads free), perfect overlap (a flash token as long as the
    longer of the floor and its reads at fio's rate), and the CPU bound (a flash token's
    measured machine CPU time, reads' kernel path included, spread over every core)."""
    by = {r["strategy"]: r for r in rows}
    if "naive" not in by or "flash" not in by or not fio_runs:
        return None
    r1m = _finite_mean([f["mb_s_1m"] for f in fio_runs])
    rbs = _finite_mean([f["mb_s_flash_bs"] for f in fio_runs])
    flash_mb = by["flash"]["mb_read_per_token"]
    disk_ms = flash_mb / rbs * 1e3
    out = {
        "fio_1m_mb_s": r1m,
        "fio_bs_mb_s": rbs,
        "bs_kib": fio_runs[0]["bs_flash"] // 1024,
        "x_io_only": by["naive"]["io_ms"] / disk_ms,
        "flash_disk_ms": disk_ms,
        "cpu_us_per_read": _finite_mean([f.get("cpu_us_per_read_flash_bs", float("nan")) for f in fio_runs]),
    }
    naive_ms = by["naive"]["ms_per_token"]
    # every core busy the whole token: the machine's CPU time per token (compute, the reads'
    # kernel path, the helper's spin) spread over all cores
    cores = os.cpu_count() or 1
    out.update(
        {
            f"x_cpu_{k}": naive_ms / (by[k]["cpu_ms"] / cores)
            for k in ("flash", "flash-wanted")
            if k in by and by[k].get("cpu_ms", 0) > 0
        }
    )
    if "floor" in by:
        floor = by["floor"]["ms_per_token"]
        out.update(floor_ms=floor, x_floor=naive_ms / floor, x_perfect_overlap=naive_ms / max(floor, disk_ms))
    else:
        out.update(floor_ms=float("nan"), x_floor=float("nan"), x_perfect_overlap=float("nan"))
    return out


def summarize(records, fio_runs, ffn_b: int, cfg) -> list[dict[str, float]]:
    rows = []
    for name, recs in records.items():
        n = len(recs)
        if not n:
            continue
        s = {k: sum(r[k] for r in recs) / n for k in recs[0]}
        ms = s["wall_s"] * 1e3
        io, mgmt, pred = s["ffn_io_s"] * 1e3, s["mgmt_s"] * 1e3, s["predict_s"] * 1e3
        row = {
            "strategy": name,
            "tokens": n,
            "ms_per_token": ms,
            "ms_median": float(np.median([r["wall_s"] for r in recs]) * 1e3),
            "ms_min": min(r["wall_s"] for r in recs) * 1e3,
            "ms_max": max(r["wall_s"] for r in recs) * 1e3,
            "io_ms": io,
            "mgmt_ms": mgmt,
            "predict_ms": pred,
            "compute_ms": ms - io - mgmt - pred,
            "attn_ms": s["attn_s"] * 1e3,
            "ffn_compute_ms": s["ffn_compute_s"] * 1e3,
            "cpu_ms": s["cpu_s"] * 1e3,
            "cores_busy": s["cpu_s"] / max(1e-9, s["wall_s"]),
            "mgmt_share": mgmt / ms,
            "crc_ms": s["crc_s"] * 1e3,
            "mb_read_per_token": s["bytes_read"] / 1e6,
            "read_mb_s_during_io": s["bytes_read"] / 1e6 / max(1e-9, s["ffn_io_s"]),
        }
        if name == "naive":
            row["mb_min_per_token"] = ffn_b / 1e6
        else:
            row.update(
                mb_min_per_token=s["bytes_useful"] / 1e6,
                read_vs_min=s["bytes_read"] / max(1.0, s["bytes_useful"]),
                requests_per_token=s["requests"],
                mean_request_kib=s["bytes_read"] / max(1.0, s["requests"]) / 1024,
                disk_ms=s["io_ns"] / 1e6,
                wait_ms=s["wait_ns"] / 1e6,
                disk_mb_s=s["bytes_read"] / 1e3 / max(1.0, s["io_ns"] / 1e6),
                miss_share=s["misses"] / (cfg.n_layers * cfg.ffn_dims[0]),
                hit_rate=s["hits"] / max(1.0, s["hits"] + s["misses"]),
                overflow_per_token=s["overflow"],
                evicted_capacity_per_token=s["evicted_capacity"],
            )
        rows.append(row)
    naive = next((r for r in rows if r["strategy"] == "naive"), None)
    for r in rows:
        r["x_vs_naive"] = naive["ms_per_token"] / r["ms_per_token"] if naive else float("nan")
        r["x_vs_naive_median"] = naive["ms_median"] / r["ms_median"] if naive else float("nan")
    return rows


def print_table(out) -> None:
    heads = [
        "strategy",
        "tok",
        "ms/tok",
        "median",
        "I/O",
        "(crc)",
        "mgmt",
        "compute",
        "(attn)",
        "MB read",
        "MB min",
        "read/min",
        "MB/s io",
        "CPU ms",
        "x naive",
        "x naive (medians)",
    ]
    keys = [
        "strategy",
        "tokens",
        "ms_per_token",
        "ms_median",
        "io_ms",
        "crc_ms",
        "mgmt_ms",
        "compute_ms",
        "attn_ms",
        "mb_read_per_token",
        "mb_min_per_token",
        "read_vs_min",
        "read_mb_s_during_io",
        "cpu_ms",
        "x_vs_naive",
        "x_vs_naive_median",
    ]
    print(" | ".join(heads))
    for r in out["rows"]:
        cells = []
        for k in keys:
            v = r.get(k)
            cells.append(
                "-"
                if v is None
                else v
                if isinstance(v, str)
                else f"{v:.0f}"
                if k == "tokens"
                else f"{v:.2f}"
                if k in ("read_vs_min", "x_vs_naive", "x_vs_naive_median")
                else f"{v:.1f}"
            )
        print(" | ".join(cells))
    for f in out["fio"]:
        print(
            f"fio 32 threads: 1 MiB {f['mb_s_1m']:.0f} MB/s, {f['bs_flash'] // 1024} KiB {f['mb_s_flash_bs']:.0f} MB/s "
            f"({f.get('cpu_us_per_read_flash_bs', float('nan')):.1f} us of CPU per read)"
        )
    b = out.get("bounds")
    if b:
        print(
            f"bounds (this run): I/O alone (naive's I/O time over flash's bytes at fio {b['bs_kib']} KiB) "
            f"{b['x_io_only']:.2f}x; floor (no reads) {b['floor_ms']:.0f} ms -> {b['x_floor']:.2f}x; "
            f"flash's reads at fio speed {b['flash_disk_ms']:.0f} ms; perfect overlap "
            f"max(floor, reads) -> {b['x_perfect_overlap']:.2f}x naive; every core busy all token: "
            + ", ".join(f"{k[6:]} {v:.2f}x" for k, v in b.items() if k.startswith("x_cpu_"))
        )
    print("kernel micro (ms/layer):", {k: round(v, 1) for k, v in out["kernel_micro_ms"].items()})
    print("generator:", {k: round(v, 4) for k, v in out["generator"].items()})


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["strategy"] for r in rows]
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 2, 4))
    bottom = [0.0] * len(rows)
    for key, color in (("io_ms", "tab:red"), ("mgmt_ms", "tab:orange"), ("compute_ms", "tab:blue")):
        vals = [r[key] for r in rows]
        ax.bar(labels, vals, bottom=bottom, label=key.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, r in enumerate(rows):
        ax.text(i, bottom[i], f"{r['ms_per_token']:.0f} ms\n{r['x_vs_naive']:.1f}x", ha="center", va="bottom")
    ax.set_ylabel("ms per token")
    ax.set_title("OPT-6.7B shape, memory 50%, window 5 (one interleaved run)")
    ax.legend()
    ax.set_ylim(0, max(bottom) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
