"""Neuron placement (`llmflash place`): how long it takes and how much co-activation there is to
exploit, without a disk in the way.

    python benches/bench_placement.py synthetic [--neurons 16384] [--tokens 2048] [--group 64]
    python benches/bench_placement.py store STORE [--sparsity predictor:0.8/0.99] [--hot 0.4]
    python benches/bench_placement.py frontier STORE [--sparsity predictor:0.8/0.99] [--hot 0.4]

synthetic: one OPT-6.7B-shaped layer (16,384 neurons) whose neurons fire in planted groups; the
seconds its order takes (the issue's bound: a minute per layer), how many groups end up in one
contiguous run, and the runs per token before and after.

store: the wanted sets of the store's sparsity source per token (calibration text to place by,
held-out text to measure on), per layer over the cold neurons (the hot share is pinned, never
read), under several orders: as converted, the placement's greedy path, a spectral order
(Fiedler vector of the Jaccard graph) and by activity. For each: runs per token and the bytes of
reading exactly the 4 KiB pages those runs touch, as a multiple of the wanted bundles' bytes (no
gaps bridged: the floor a page-granular reader can reach in that order), for the wanted sets
and for the window's entries (neurons wanted now but not in the last 4 tokens: what a cache
holding the window must read).

frontier: what a reader could trade between bytes and requests on held-out text, in the store's
order and as converted. Per token and layer, the cold wanted bundles become byte ranges at a read
granularity (4 KiB pages, as the planner reads; 512-byte sectors, the smallest direct read of a
disk with 512-byte logical blocks), runs that touch merge, and every gap up to a limit is read
through (limits in steps of 4 KiB, or 1 KiB at 512-byte granularity: half the runs, about the
same curve). For each limit: bytes read as a multiple of the wanted bundles' bytes, requests per
token, KB per request and the seconds the disk profile (`llmflash profile-disk`, else the
built-in table) prices them at (32 in flight, no cache: an upper bound on a token's reads). The
limit the profile finds cheapest is marked, and so is the cheapest plan within 1.5x the bytes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from llmflash.placement import order as O
from llmflash.placement.coactivation import runs_per_token

PAGE = 4096


def synthetic(a: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    n = a.neurons - a.neurons % a.group
    perm = torch.randperm(n, generator=g)
    groups = perm.view(-1, a.group)
    on = torch.rand(a.tokens, groups.shape[0], generator=g) < a.p
    wanted = on[:, torch.argsort(perm) // a.group] | (torch.rand(a.tokens, n, generator=g) < a.noise)
    t0 = time.perf_counter()
    order = O.layer_order(wanted)
    dt = time.perf_counter() - t0
    pos = torch.empty_like(order)
    pos[order] = torch.arange(n)
    whole = sum(int(pos[gr].max() - pos[gr].min()) == a.group - 1 for gr in groups)
    print(
        f"{n} neurons, {a.tokens} tokens, groups of {a.group} (p {a.p}, noise {a.noise}): order in {dt:.1f} s; "
        f"{whole} of {len(groups)} groups contiguous; runs per token {runs_per_token(wanted, None):.0f} -> "
        f"{runs_per_token(wanted, order):.0f}"
    )


def page_bytes(w: np.ndarray, bundle: int) -> tuple[float, float]:
    """(runs per token, bytes of the exact pages the runs touch / bytes of the wanted bundles)."""
    runs = pages = want = 0
    for row in w:
        idx = np.flatnonzero(row)
        if not len(idx):
            continue
        want += len(idx)
        cut = np.diff(idx) > 1
        starts, ends = idx[np.r_[True, cut]], idx[np.r_[cut, True]]
        runs += len(starts)
        touched: set[int] = set()
        for s, e in zip(starts * bundle // PAGE, ((ends + 1) * bundle - 1) // PAGE):
            touched.update(range(int(s), int(e) + 1))
        pages += len(touched)
    return runs / len(w), pages * PAGE / max(1, want * bundle)


def entries(w: torch.Tensor, window: int = 4) -> torch.Tensor:
    out = w.clone()
    for t in range(1, w.shape[0]):
        out[t] &= ~w[max(0, t - window) : t].any(0)
    return out


def spectral(w: torch.Tensor) -> torch.Tensor:
    x = w.double()
    c = x.T @ x
    cnt = x.sum(0)
    u = cnt[:, None] + cnt[None, :] - c
    s = torch.where(u > 0, c / u.clamp_min(1.0), torch.zeros_like(c))
    s.fill_diagonal_(0.0)
    dinv = 1.0 / s.sum(1).clamp_min(1e-12).sqrt()
    lap = torch.eye(len(s), dtype=torch.float64) - dinv[:, None] * s * dinv[None, :]
    return torch.argsort(dinv * torch.linalg.eigh(lap).eigenvectors[:, 1])


def store(a: argparse.Namespace) -> None:
    from llmflash.commands.texts import default_text, heldout_text, token_ids
    from llmflash.placement.coactivation import record_wanted
    from llmflash.sparsity import make_source
    from llmflash.store import Store
    from llmflash.strategies.dense import DenseFFN

    torch.set_num_threads(2)
    s = Store(a.store)
    src = make_source(a.sparsity, s, hot=a.hot)
    dense = DenseFFN(s, dequantize=True)
    cal = record_wanted(s, dense, src, token_ids(s, [default_text()])[: a.tokens], 512, False)
    held = record_wanted(s, dense, src, token_ids(s, [heldout_text()])[: a.heldout], 512, False)
    hot = getattr(src, "hot", None)
    totals: dict[str, list[float]] = {}
    for i in range(0, len(cal), a.every):
        n = cal[i].shape[1]
        is_hot = torch.zeros(n, dtype=torch.bool)
        if hot is not None:
            is_hot[hot[i]] = True
        cold = torch.nonzero(~is_hot).flatten()
        wc, wh = cal[i][:, cold], held[i][:, cold]
        act = wc.sum(0).double().numpy()
        orders = {
            "converted": torch.arange(len(cold)),
            "placed": torch.from_numpy(O.greedy_path(*O.top_partners(wc), act)),
            "spectral": spectral(wc),
            "by activity": torch.argsort(torch.from_numpy(-act)),
        }
        line = [f"layer {i}: {len(cold)} cold, {wh.float().mean():.0%} wanted"]
        for k, o in orders.items():
            for what, w in (("wanted", wh), ("entries", entries(wh))):
                r, x = page_bytes(w[:, o].numpy(), s.layers[i].bundle_bytes)
                totals.setdefault(f"{k} {what}", []).append(x)
                line.append(f"{k}/{what} {r:.0f} runs {x:.2f}x")
        print("; ".join(line))
    print("\nexact 4 KiB pages / wanted bytes, mean over the layers shown:")
    for k, v in totals.items():
        print(f"  {k:<24} {np.mean(v):.3f}x")


def plan_runs(pos: np.ndarray, bundle: int, unit: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted store positions -> (run lengths, gaps between runs) in bytes at granularity `unit`."""
    a, b = pos * bundle // unit, -(-(pos + 1) * bundle // unit)
    keep = a[1:] > b[:-1]
    s, e = np.r_[a[:1], a[1:][keep]], np.r_[b[:-1][keep], b[-1:]]
    return (e - s) * unit, (s[1:] - e[:-1]) * unit


def frontier(a: argparse.Namespace) -> None:
    from llmflash.commands.texts import heldout_text, token_ids
    from llmflash.io import load_profile
    from llmflash.placement.coactivation import record_wanted
    from llmflash.sparsity import make_source
    from llmflash.store import Store
    from llmflash.strategies.dense import DenseFFN

    torch.set_num_threads(2)
    s = Store(a.store)
    src = make_source(a.sparsity, s, hot=a.hot)
    held = record_wanted(s, DenseFFN(s, dequantize=True), src, token_ids(s, [heldout_text()])[: a.heldout], 512, False)
    hot, profile = getattr(src, "hot", None), load_profile()
    price: dict[int, float] = {}

    def seconds(size: float) -> float:
        k = int(size)
        if k not in price:
            price[k] = profile.request_seconds(k, 32)
        return price[k]

    T = held[0].shape[0]
    print(f"{a.store}: {T} held-out tokens, {a.sparsity}, --hot {a.hot}; profile: {profile.source or 'built-in'}")
    for name in ("as converted", "this store's order"):
        for unit in (4096, 512):
            limits = list(range(0, a.max_gap + 1, unit if unit == 4096 else 1024))
            acc = np.zeros((len(limits), 3))  # bytes, requests, seconds
            want = 0
            for i, lay in enumerate(s.layers):
                n, bb = held[i].shape[1], lay.bundle_bytes
                cold = torch.ones(n, dtype=torch.bool)
                if hot is not None:
                    cold[hot[i]] = False
                pos = np.arange(n) if name == "as converted" or lay.order is None else np.argsort(np.asarray(lay.order))
                w = (held[i] & cold).numpy()
                for t in range(T):
                    p = np.sort(pos[np.flatnonzero(w[t])])
                    if not len(p):
                        continue
                    want += len(p) * bb
                    lens, gaps = plan_runs(p, bb, unit)
                    for j, g in enumerate(limits):
                        cut = gaps > g
                        seg = np.r_[0, np.cumsum(cut)]
                        size = np.bincount(seg, weights=lens, minlength=seg[-1] + 1)
                        size += np.bincount(seg[1:], weights=np.where(cut, 0, gaps), minlength=seg[-1] + 1)
                        acc[j] += (size.sum(), len(size), sum(seconds(x) for x in size))
            best = int(np.argmin(acc[:, 2]))
            within = [j for j in range(len(limits)) if acc[j, 0] <= 1.5 * want]
            best15 = min(within, key=lambda j: acc[j, 2]) if within else None
            print(f"\n{name}, {unit}-byte reads (wanted bundles {want / T / 1e6:.1f} MB/token)")
            print(f"  {'gap <=':>8} {'bytes':>7} {'reads/tok':>10} {'KB/read':>8} {'ms/tok':>7}")
            for j, g in enumerate(limits):
                if g % 4096 and j not in (best, best15):
                    continue
                by, n, sec = acc[j]
                mark = "  <- cheapest" if j == best else "  <- cheapest within 1.5x" if j == best15 else ""
                row = f"{g / 1024:7.0f}K {by / want:6.2f}x {n / T:10.0f} {by / n / 1024:8.1f} {sec / T * 1e3:7.1f}"
                print(f"  {row}{mark}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("synthetic")
    p.add_argument("--neurons", type=int, default=16384)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--p", type=float, default=0.05, help="a group's firing probability per token")
    p.add_argument("--noise", type=float, default=0.01, help="independent firing probability per neuron")
    p.set_defaults(run=synthetic)
    p = sub.add_parser("store")
    p.add_argument("store")
    p.add_argument("--sparsity", default="predictor:0.8/0.99")
    p.add_argument("--hot", type=float, default=0.4)
    p.add_argument("--tokens", type=int, default=4096, help="calibration tokens to place by")
    p.add_argument("--heldout", type=int, default=1024, help="held-out tokens to measure on")
    p.add_argument("--every", type=int, default=3, help="measure every k-th layer")
    p.set_defaults(run=store)
    p = sub.add_parser("frontier")
    p.add_argument("store")
    p.add_argument("--sparsity", default="predictor:0.8/0.99")
    p.add_argument("--hot", type=float, default=0.4)
    p.add_argument("--heldout", type=int, default=256, help="held-out tokens to measure on")
    p.add_argument("--max-gap", type=int, default=65536, help="widest gap limit tried (bytes)")
    p.set_defaults(run=frontier)
    a = ap.parse_args()
    a.run(a)


if __name__ == "__main__":
    main()
