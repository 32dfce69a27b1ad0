"""A layer's neuron order from co-activation: neurons that are wanted by the same tokens side by
side, so a token's reads are few runs of neighbouring bundles instead of scattered ones.

Affinity of neurons i and j: the Jaccard index of the tokens that want them,
C_ij / (c_i + c_j - C_ij) (C_ij tokens want both, c_i tokens want i). Raw counts would pair
every neuron with the most active ones; Jaccard pairs the ones that fire together *and* rarely
apart. Only each neuron's `partners` best are kept (`top_partners`, computed a block of rows at
a time), so a 16,384-neuron layer needs megabytes, not the gigabyte of its full matrix.

The order (`greedy_path`) is a path through that sparse graph, as Ripple (ASPLOS '25) orders
neurons: start at the most active neuron, then repeatedly append the unplaced neuron with the
highest affinity to the neurons placed so far, each placed neuron's weight decaying by `decay`
a step: mostly the last few (a chain that keeps a group together even where its members are not
each other's best partners), but a group member left behind keeps a trace and is taken before
an unrelated neuron; where no unplaced neuron has any affinity at all, continue with the most
active unplaced one. Hot neurons (pinned in DRAM at
run time: never read per token) go last, most active first, so the neurons that are read stay
contiguous.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .settings import DECAY, PARTNERS

ROW_BLOCK = 2048  # rows of the co-activation matrix computed at a time


def top_partners(wanted: Tensor, partners: int = PARTNERS) -> tuple[np.ndarray, np.ndarray]:
    """wanted (T, m) bool (token t wants neuron i) -> (idx, aff), each (m, k) with k =
    min(partners, m - 1): neuron i's k best partners by Jaccard affinity and the affinities
    (0 where the pair never co-occurs). Computed ROW_BLOCK rows of C = W^T W at a time."""
    T, m = wanted.shape
    k = max(0, min(partners, m - 1))
    if k == 0:
        return np.zeros((m, 0), np.int64), np.zeros((m, 0), np.float32)
    w = wanted.to(torch.float32)
    counts = w.sum(0)  # (m,)
    idx = np.empty((m, k), np.int64)
    aff = np.empty((m, k), np.float32)
    for a in range(0, m, ROW_BLOCK):
        b = min(a + ROW_BLOCK, m)
        c = w[:, a:b].T @ w  # (b - a, m) co-occurrence counts
        union = counts[a:b, None] + counts[None, :] - c
        j = torch.where(union > 0, c / union.clamp_min(1.0), torch.zeros_like(c))
        j[torch.arange(b - a), torch.arange(a, b)] = -1.0  # never one's own partner
        top = torch.topk(j, k, dim=1)
        idx[a:b] = top.indices.numpy()
        aff[a:b] = top.values.clamp_min(0.0).numpy()
    return idx, aff


def greedy_path(idx: np.ndarray, aff: np.ndarray, activity: np.ndarray, decay: float = DECAY) -> np.ndarray:
    """A permutation of range(m) (m = len(activity)): the greedy path described in the module
    docstring over the sparse affinities (idx, aff: top_partners, made symmetric here), ties and
    dead ends broken by `activity` (higher first)."""
    m = len(activity)
    # symmetric neighbour lists: j among i's partners makes i one of j's
    rows = np.repeat(np.arange(m), idx.shape[1])
    cols, vals = idx.ravel(), aff.ravel()
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    src = np.concatenate([rows, cols])
    dst = np.concatenate([cols, rows])
    val = np.concatenate([vals, vals]).astype(np.float64)
    by = np.argsort(src, kind="stable")
    src, dst, val = src[by], dst[by], val[by]
    start = np.searchsorted(src, np.arange(m + 1))
    by_activity = np.argsort(-np.asarray(activity, dtype=np.float64), kind="stable")
    score = np.zeros(m)
    placed = np.zeros(m, dtype=bool)
    order = np.empty(m, dtype=np.int64)
    next_active = 0  # position in by_activity of the most active neuron perhaps unplaced
    cur = int(by_activity[0]) if m else 0
    for step in range(m):
        order[step] = cur
        placed[cur] = True
        score[cur] = -np.inf
        score *= decay  # -inf stays -inf for placed neurons
        if step % 512 == 511:  # traces below any real affinity: zero, before they turn subnormal (slow)
            score[(score > 0) & (score < 1e-200)] = 0.0
        s, e = start[cur], start[cur + 1]
        score[dst[s:e]] += val[s:e]
        if step + 1 == m:
            break
        best = int(np.argmax(score))
        if score[best] > 0:
            cur = best
            continue
        while placed[by_activity[next_active]]:
            next_active += 1
        cur = int(by_activity[next_active])
    return order


def layer_order(wanted: Tensor, hot: Tensor | None = None, partners: int = PARTNERS, decay: float = DECAY) -> Tensor:
    """The placement of one layer: wanted (T, n) bool over original neuron ids, `hot` the
    original ids pinned at run time (or None) -> order (n,) int64, order[p] = the original id
    stored at position p: the cold neurons along greedy_path, then the hot ones, most active
    first."""
    n = wanted.shape[1]
    is_hot = torch.zeros(n, dtype=torch.bool)
    if hot is not None and len(hot):
        is_hot[hot.long()] = True
    cold = torch.nonzero(~is_hot).flatten()
    hot_ids = torch.nonzero(is_hot).flatten()
    activity = wanted.sum(0).to(torch.float64)
    w = wanted[:, cold]
    idx, aff = top_partners(w, partners)
    path = cold[torch.from_numpy(greedy_path(idx, aff, activity[cold].numpy(), decay))]
    hot_sorted = hot_ids[torch.argsort(-activity[hot_ids], stable=True)]
    return torch.cat([path, hot_sorted])
