"""Wanted-set generator matching the paper's OPT-6.7B statistics (LLM in a flash, §3.1 / Fig. 4):
about 10% of a layer's FFN neurons wanted per token, and with a sliding window of 5 tokens about
2.4% of the layer new per token (wanted now, not wanted in any of the last 5 tokens).

Model, per layer and neuron (deterministic for a seed):
  - a hot set (share `hot`, default 2%) wanted at every token (ReLU models have such neurons);
  - every other neuron follows a two-state Markov chain: off -> on with probability b, on -> off
    with probability a, started from its stationary law. b and a are solved so that
        P(on)                                     = pc = (wanted - hot) / (1 - hot)
        P(on at t, off at t-1 .. t-k) = (1 - pc) (1 - b)^(k-1) b = (new) / (1 - hot)
    (the second equation is increasing in b up to b = 1/k; the smaller root is taken).
Neurons are independent and their positions uniform: no co-activation structure for the store's
neuron order to exploit (the conservative case for I/O: wanted bundles are scattered).

Note what the two targets imply: the live set a window-5 cache must hold (wanted in any of the
last 6 tokens) is at least wanted + 5 x new = 22% of the FFN, whatever the process; the paper's
24% cached is that. `stats()` measures it.

    python benches/wanted_sets.py                  # prints the statistics of the default process
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Params:
    n_layers: int = 32
    n_neurons: int = 16384
    wanted: float = 0.10  # share wanted per token
    new: float = 0.024  # share new per token vs the last `window` tokens
    window: int = 5
    hot: float = 0.02  # share always wanted
    seed: int = 0

    def rates(self) -> tuple[float, float, float]:
        """(pc, b, a): the churn neurons' stationary on-share and off->on / on->off rates."""
        h, k = self.hot, self.window
        pc = (self.wanted - h) / (1 - h)
        target = self.new / (1 - h) / (1 - pc)  # = (1 - b)^(k-1) b
        f = lambda b: (1 - b) ** (k - 1) * b  # noqa: E731
        lo, hi = 0.0, 1.0 / k
        if f(hi) < target:
            raise ValueError(f"new share {self.new} is unreachable with window {k} and wanted {self.wanted}")
        for _ in range(100):  # bisection on the rising branch
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
        b = (lo + hi) / 2
        return pc, b, b * (1 - pc) / pc


def generate(p: Params, tokens: int) -> list[list[np.ndarray]]:
    """sets[t][layer]: sorted uint32 neuron ids wanted at token t (positions in a store with the
    identity neuron order)."""
    pc, b, a = p.rates()
    out: list[list[np.ndarray]] = [[] for _ in range(tokens)]
    for layer in range(p.n_layers):
        rng = np.random.default_rng([p.seed, layer])
        n_hot = int(round(p.hot * p.n_neurons))
        hot = np.zeros(p.n_neurons, dtype=bool)
        hot[rng.choice(p.n_neurons, n_hot, replace=False)] = True
        on = rng.random(p.n_neurons) < pc  # stationary start
        for t in range(tokens):
            u = rng.random(p.n_neurons)
            on = np.where(on, u >= a, u < b)
            out[t].append(np.flatnonzero(on | hot).astype(np.uint32))
    return out


def stats(
    sets: list[list[np.ndarray]], n_neurons: int, window: int, capacity: int | None = None, skip: int | None = None
) -> dict[str, float]:
    """Measured, averaged over layers and tokens t >= skip (default: window):
    wanted share; new share (wanted at t, not in t-window..t-1); live share (the union of
    t-window..t: what a window cache holds); and, given a per-layer `capacity`, the share a
    least-recently-wanted cache of that size must read (the window's rule, then eviction of the
    least recently wanted under pressure: llmflash's NeuronCache)."""
    skip = window if skip is None else skip
    tokens, layers = len(sets), len(sets[0])
    wanted, new, live, miss, n = 0.0, 0.0, 0.0, 0.0, 0
    for layer in range(layers):
        last = np.full(n_neurons, -(1 << 30), dtype=np.int64)  # token each neuron was last wanted
        cached = np.zeros(n_neurons, dtype=bool)
        for t in range(tokens):
            w = sets[t][layer]
            recent = last >= t - window
            is_new = ~recent[w]
            cached &= recent  # the window's eviction
            missing = w[~cached[w]]
            if capacity is not None:
                cached[w] = True
                over = int(cached.sum()) - capacity
                if over > 0:  # least recently wanted, not wanted now
                    cand = np.flatnonzero(cached)
                    cand = cand[last[cand] < t]
                    cached[cand[np.argsort(last[cand], kind="stable")[:over]]] = False
            last[w] = t
            if t >= skip:
                wanted += len(w)
                new += int(is_new.sum())
                live += int((last >= t - window).sum())
                miss += len(missing)
                n += 1
    d = n * n_neurons
    out = {"wanted_share": wanted / d, "new_share": new / d, "live_share": live / d, "tokens": tokens - skip}
    if capacity is not None:
        out["miss_share"] = miss / d
        out["capacity_share"] = capacity / n_neurons
    return out


class Replay:
    """A WantedSource (llmflash.sparsity) replaying precomputed sets: token t's set for a layer
    on the t-th call with that layer; the token advances at layer 0. x is ignored."""

    def __init__(self, sets: list[list[np.ndarray]]):
        self.sets = sets
        self.t = -1

    def __call__(self, layer: int, x=None) -> np.ndarray:
        if layer == 0:
            self.t += 1
        return self.sets[self.t][layer]


class LookaheadReplay(Replay):
    """Replay that also names layer+1's set while layer runs (`ahead`, llmflash.strategies.flash):
    what a one-layer-ahead predictor would give (Deja Vu's lookahead, PowerInfer-2's pipeline),
    here exact. It measures what the engine gains when reads of the next layer overlap this
    layer's compute; the accuracy of such a predictor is not modelled."""

    ahead_exact = True  # final: FlashFFN does not check it at layer+1

    def ahead(self, layer: int, x=None) -> np.ndarray:
        return self.sets[self.t][layer + 1]


class GuessReplay(Replay):
    """Replay with `early(layer, x)`: the layer's set guessed before its attention (FlashFFN
    lookahead="attention"), with a given recall (share of the set named) and precision (share of
    the guess in the set; the rest drawn uniformly from the other neurons), deterministic per
    (seed, token, layer). The FFN then asks for the true set (the replay) and reads what the
    guess missed. Recall = precision = 0.816 is what SmolLM2's oracle measured from the
    attention input (`llmflash eval --sparsity oracle --lookahead attention`)."""

    def __init__(
        self, sets: list[list[np.ndarray]], n_neurons: int, recall: float = 1.0, precision: float = 1.0, seed: int = 0
    ):
        super().__init__(sets)
        self.n, self.recall, self.precision, self.seed = n_neurons, recall, precision, seed

    def early(self, layer: int, x=None) -> np.ndarray:
        t = self.t + 1 if layer == 0 else self.t  # layer 0's guess comes before the step advances
        true = np.asarray(self.sets[t][layer])
        if self.recall >= 1.0 and self.precision >= 1.0:
            return true
        rng = np.random.default_rng([self.seed, t, layer])
        kept = true[rng.random(len(true)) < self.recall]
        n_extra = int(round(len(kept) * (1.0 / self.precision - 1.0)))
        others = np.setdiff1d(np.arange(self.n), true, assume_unique=True)
        extra = rng.choice(others, size=min(n_extra, len(others)), replace=False)
        return np.sort(np.concatenate([kept, extra]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hot", type=float, default=Params.hot)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--capacity-share",
        type=float,
        default=0.2231,
        help="cache capacity per layer as a share of its neurons (default: OPT-6.7B at 50%% memory)",
    )
    a = ap.parse_args(argv)
    p = Params(n_layers=a.layers, hot=a.hot, seed=a.seed)
    pc, b, rate_a = p.rates()
    sets = generate(p, a.tokens)
    s = stats(sets, p.n_neurons, p.window, capacity=int(a.capacity_share * p.n_neurons))
    print(
        f"churn neurons: on-share {pc:.4f}, off->on {b:.4f}, on->off {rate_a:.4f} (mean on-run {1 / rate_a:.1f} tokens)"
    )
    print("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
