"""Which neurons each token of a text wants, per layer: the statistics placement orders by.

The dense model runs over the text in chunks (a fresh KV cache each, as calibration records),
through an FFN that computes the dense result and notes, for every token and layer, the wanted
set the store's sparsity source names for that token alone (original neuron ids): a source's
per-token sets in one batched call where it has them (`predict`: the calibrated predictors, hot
neurons included since they are always computed; the oracle before calibration), else the
source called one token at a time. A sticky source's hysteresis is left out: it depends on the cache, not on the text.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..models.transformer import Transformer
from ..store import Store


class _Recorder:
    """The dense FFN, noting each token's wanted set per layer in `wanted` ((T, n) bool)."""

    def __init__(self, dense: Any, source: Any, n_tokens: int, ffn_dims: list[int]):
        self.dense, self.source = dense, source
        self.wanted = [torch.zeros(n_tokens, n, dtype=torch.bool) for n in ffn_dims]
        # per layer, the next token's row: the text runs in order, but a wide model's forward
        # pass splits a chunk into several passes (Transformer.prefill_chunk), each calling every
        # layer in turn
        self.at = [0] * len(ffn_dims)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        T = x.shape[0]
        rows = self.wanted[layer][self.at[layer] : self.at[layer] + T]
        self.at[layer] += T
        predict = getattr(self.source, "predict", None)
        if predict is not None:
            rows |= predict(layer, x)
        else:
            for t in range(T):
                rows[t, self.source(layer, x[t : t + 1])] = True
        return self.dense(layer, x)


def record_wanted(
    store: Store, dense: Any, source: Any, ids: list[int], chunk: int, progress: bool = True
) -> list[Tensor]:
    """Per layer, (len(ids), n) bool: token t of `ids` wants neuron j (original id), as `source`
    names it (see the module docstring); `dense` computes the FFN (a DenseFFN)."""
    from tqdm import tqdm

    chunk = max(1, min(chunk, store.config.max_positions))
    rec = _Recorder(dense, source, len(ids), list(store.config.ffn_dims))
    model = Transformer.from_store(store, rec)
    with torch.inference_mode(), tqdm(total=len(ids), desc="record", unit="tok", disable=not progress) as bar:
        for s in range(0, len(ids), chunk):
            piece = torch.tensor(ids[s : s + chunk], dtype=torch.long)
            model.forward(piece, model.new_cache(piece.numel()), last_only=True)
            bar.update(piece.numel())
    return rec.wanted


def runs_per_token(wanted: Tensor, order: Tensor | None) -> float:
    """Mean number of runs of neighbouring store positions a token's wanted set forms (`order`:
    order[p] = original id at position p; None: the original order): the reads a token would
    need with nothing cached and no gaps bridged."""
    w = wanted if order is None else wanted[:, order]
    starts = w[:, :1].sum() + (w[:, 1:] & ~w[:, :-1]).sum()
    return float(starts) / max(1, w.shape[0])
