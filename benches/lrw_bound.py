"""What a least-recently-wanted cache must read per token with the oracle's sets, by cache size:
the floor any predictor faces at a given DRAM share (benches/HISTORY.md, "Fourth session").

Runs the dense model once over held-out text, records each layer's |silu(gate) * up| per token,
takes the top KEEP share per token (the oracle), and replays those sets through a window-K cache
of each size (evict what fell out of the window, then the least recently wanted; what does not
fit is read and dropped). Prints the share of the FFN's bundles read per token.

    python benches/lrw_bound.py [STORE] [--tokens 512] [--keep 0.5] [--window 4] [--cache 0.347 0.45 0.555]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from llmflash.commands.texts import heldout_text
from llmflash.defaults import store_or_default
from llmflash.models.transformer import Transformer
from llmflash.sparsity.labels import activations
from llmflash.store import Store
from llmflash.strategies.dense import DenseFFN


def oracle_sets(store: Store, tokens: int, keep: float) -> np.ndarray:
    """(layers, tokens, n) bool: each token's top-`keep` neurons by |act| (store positions)."""
    dense, acts = DenseFFN(store), []

    def ffn(layer: int, x: torch.Tensor) -> torch.Tensor:
        acts.append(activations(store.config, dense.w1[layer], x, dense.b1[layer]).abs())
        return dense(layer, x)

    ids = torch.tensor(store.tokenizer().encode(heldout_text()).ids[:tokens])
    model = Transformer.from_store(store, ffn)
    with torch.inference_mode():
        model.forward(ids, model.new_cache(len(ids)))
    out = []
    for a in acts:
        k = int(keep * a.shape[1])
        m = torch.zeros_like(a, dtype=torch.bool)
        m.scatter_(1, a.topk(k, dim=1).indices, True)
        out.append(m.numpy())
    return np.stack(out)


def lrw_reads(sets: np.ndarray, capacity: int, window: int) -> float:
    """Share of (token, neuron) bundles read: wanted and not cached, summed over layers."""
    L, N, n = sets.shape
    reads = 0
    for layer in range(L):
        cached, last = np.zeros(n, bool), np.full(n, -(10**9))
        for t in range(N):
            w = sets[layer, t]
            miss = w & ~cached
            reads += int(miss.sum())
            cached &= last >= t - window  # the window
            new = np.flatnonzero(miss)
            free = capacity - int(cached.sum())
            if len(new) > free:  # least recently wanted first
                cand = np.flatnonzero(cached & ~w)
                k = min(len(new) - free, len(cand))
                cached[cand[np.argsort(last[cand], kind="stable")[:k]]] = False
                new = new[: max(free + k, 0)]
            cached[new] = True
            last[w & cached] = t
    return reads / (L * N * n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--keep", type=float, default=0.5)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--cache", type=float, nargs="+", default=[0.347, 0.41, 0.45, 0.555])
    a = p.parse_args()
    torch.set_num_threads(2)
    store = Store(store_or_default(a.store))
    sets = oracle_sets(store, a.tokens, a.keep)
    n = sets.shape[2]
    for share in tqdm(a.cache, desc="cache sizes"):
        reads = lrw_reads(sets, int(share * n), a.window)
        print(f"cache {share:.1%} of the FFN: oracle top-{a.keep:.0%} reads {reads:.1%} of the FFN's bundles per token")


if __name__ == "__main__":
    main()
