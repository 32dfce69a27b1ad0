"""Calibration of the sparsity predictors of a store: recording, training, rates, saving.

1. Run the dense model (float32 activations) over calibration text in chunks of `chunk` tokens,
   a fresh KV cache per chunk, through a recording FFN that keeps, per layer, the FFN input x
   (in the store dtype: what the predictor sees at run time) and the labels, bit-packed (1 bit
   per token and neuron). The magnitude threshold of each layer's labels is the (1 - keep)
   quantile of |act| over the first THRESHOLD_TOKENS tokens (whole chunks; a sample of their
   T x n values), fixed before any label is written, so every token is labelled by the same rule.
2. Train each layer's predictor (balanced BCE, Adam, `epochs` passes) on all but the last
   `heldout` share of tokens; those (whole chunks of different text) choose the layer's logit
   threshold for the target recall and give the quantile tables stored with it. The shadow kind
   trains nothing: it quantizes the layer's gate/up rows and measures their held-out scores.
3. Write predictors.safetensors atomically (temporary file + os.replace) and record it in the
   manifest ("predictors": {file, bytes, rank, ...}; in a version-4 store also its size and
   CRC-32 under "files", and the manifest's new checksum), also by an atomic replace.

Deterministic for a given seed (torch's CPU kernels with a fixed thread count). The command and
its argument checks: llmflash.commands.calibrate.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

import torch
from torch import Tensor

from ..models.layers import linear
from ..store import PREDICTORS, Store, write_manifest
from ..store.checksums import file_entry
from .labels import activations, label_kind, labels, pack_bits, unpack_bits
from .lowrank import TrainResult, train_layer
from .neurons import in_original_ids, order_inverse
from .predictors_file import save_predictors
from .quantiles import expected, sample_quantiles, threshold_for_recall
from .shadow import ShadowLayer

THRESHOLD_TOKENS = 1024  # the label thresholds come from |act| over the first 1024 tokens


class DenseWeights(Protocol):
    """The FFN weights as the dense strategy holds them, per layer, in store neuron order:
    w1 (2n, D) gate rows then up rows (or (n, D) up rows), b1 (n,) fc1 bias or None, w2 (D, n)."""

    w1: list[Tensor]
    b1: list[Tensor | None]
    w2: list[Tensor]


class RecordingFFN:
    """The dense FFN (its weights and math) that also records, per layer, the FFN input and the
    bit-packed labels of each token, in original neuron ids."""

    def __init__(self, store: Store, dense: DenseWeights, capacity: int, keep: float, threshold_tokens: int = 512):
        self.dense = dense
        c = self.config = store.config
        self.kind = label_kind(c)
        self.keep = keep
        self.capacity = capacity
        self.x = [torch.empty(capacity, c.dim, dtype=store.dtype) for _ in range(c.n_layers)]
        self.y = [torch.empty(capacity, (n + 7) // 8, dtype=torch.uint8) for n in c.ffn_dims]
        self.inverse = [order_inverse(L.order) for L in store.layers]
        self.thresholds: list[float] | None = None if self.kind == "magnitude" else [0.0] * c.n_layers
        self.threshold_tokens = threshold_tokens
        self._pending: list[list[Tensor]] = [[] for _ in range(c.n_layers)]  # |act| until thresholds
        self.pos = 0  # first row of the current chunk
        # per layer, the next row to write: a wide model's forward pass splits a chunk into
        # several passes (Transformer.prefill_chunk), each calling every layer in turn
        self.at = [0] * c.n_layers

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        T = x.shape[0]
        d = self.dense
        act = activations(self.config, d.w1[layer], x, d.b1[layer])  # (T, n) float32, store positions
        a = in_original_ids(act, self.inverse[layer])
        rows = slice(self.at[layer], self.at[layer] + T)
        self.at[layer] += T
        self.x[layer][rows] = x
        if self.thresholds is None:
            self._pending[layer].append(a.abs())
        else:
            self.y[layer][rows] = pack_bits(labels(self.kind, a, self.thresholds[layer]))
        return linear(act, d.w2[layer])  # (T, D)

    def end_chunk(self, T: int) -> None:
        """Advance past a chunk of T tokens; fix the label thresholds once enough tokens were seen."""
        self.pos += T
        self.at = [self.pos] * len(self.at)
        if self.thresholds is None and self.pos >= min(self.threshold_tokens, self.capacity):
            self._fix_thresholds()

    def _fix_thresholds(self) -> None:
        """Each layer's label threshold from the |act| held back so far; then label those tokens."""
        gen = torch.Generator().manual_seed(0)
        self.thresholds = []
        for layer, parts in enumerate(self._pending):
            a = torch.cat(parts).flatten()
            if a.numel() > 1 << 22:
                a = a[torch.randint(a.numel(), (1 << 22,), generator=gen)]
            self.thresholds.append(float(torch.quantile(a.double(), 1.0 - self.keep)))
            start = 0
            for p in parts:  # label what was held back
                self.y[layer][start : start + p.shape[0]] = pack_bits(p > self.thresholds[-1])
                start += p.shape[0]
        self._pending = [[] for _ in self._pending]


def record(
    store: Store, dense: DenseWeights, ids: list[int], keep: float, chunk: int, progress: bool = True
) -> RecordingFFN:
    """Run the dense model over `ids` in chunks (fresh KV cache each), recording x and labels."""
    from tqdm import tqdm

    from ..models.transformer import Transformer

    chunk = max(1, min(chunk, store.config.max_positions))
    rec = RecordingFFN(store, dense, len(ids), keep, threshold_tokens=max(chunk, THRESHOLD_TOKENS))
    model = Transformer.from_store(store, rec)
    with tqdm(total=len(ids), desc="record", unit="tok", disable=not progress) as bar:
        for s in range(0, len(ids), chunk):
            piece = torch.tensor(ids[s : s + chunk], dtype=torch.long)
            model.forward(piece, model.new_cache(piece.numel()), last_only=True)
            rec.end_chunk(piece.numel())
            bar.update(piece.numel())
    rec.end_chunk(0)
    return rec


def heldout_tokens(n: int, heldout: float, chunk: int) -> int:
    """How many of the last of `n` tokens to hold out: about the `heldout` share, rounded up to
    whole chunks (different text from what the predictor trains on) while that leaves at least
    as many for training, and at least 1 token left to train on."""
    n_held = max(1, int(round(n * heldout)))
    aligned = -(-n_held // chunk) * chunk
    if n - aligned >= aligned:
        n_held = aligned
    return min(n_held, n - 1)


def train_lowrank(
    rec: RecordingFFN,
    n_held: int,
    rank: int,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    dtype: torch.dtype,
    progress: bool = True,
) -> list[TrainResult]:
    """Every layer's low-rank predictor, trained on the recorded tokens but the last `n_held`."""
    from tqdm import tqdm

    c, N = rec.config, rec.pos
    steps = epochs * max(1, (N - n_held) // min(batch, N - n_held))
    results = []
    with tqdm(total=steps * c.n_layers, desc="train", unit="step", disable=not progress) as bar:
        for layer in range(c.n_layers):
            bar.set_postfix(layer=layer)
            results.append(
                train_layer(
                    rec.x[layer],
                    rec.y[layer],
                    c.ffn_dims[layer],
                    rank,
                    n_held,
                    epochs=epochs,
                    batch=batch,
                    lr=lr,
                    seed=seed * 1000 + layer,
                    dtype=dtype,
                    progress=bar,
                )
            )
    return results


def quantize_shadows(
    rec: RecordingFFN, store: Store, n_held: int, seed: int, progress: bool = True
) -> list[TrainResult]:
    """Every layer's 4-bit shadow, with its held-out score quantiles."""
    from tqdm import tqdm

    return [
        _shadow(rec, store, layer, n_held, seed * 1000 + layer)
        for layer in tqdm(range(rec.config.n_layers), desc="shadow", unit="layer", disable=not progress)
    ]


def _shadow(rec: RecordingFFN, store: Store, layer: int, n_held: int, seed: int) -> TrainResult:
    """The 4-bit shadow of one layer's gate/up rows (original neuron order, as the labels), and
    its held-out score quantiles."""
    d, c = rec.dense, rec.config
    n = c.ffn_dims[layer]
    w1, b1 = d.w1[layer], d.b1[layer]
    inverse = order_inverse(store.layers[layer].order)  # rows in store positions -> original ids
    if c.gated:
        w1 = torch.cat([in_original_ids(w1[:n], inverse, dim=0), in_original_ids(w1[n:], inverse, dim=0)])
    else:
        w1 = in_original_ids(w1, inverse, dim=0)
    b1 = None if b1 is None else in_original_ids(b1, inverse, dim=0)
    shadow = ShadowLayer.from_weights(w1, c.gated, b1 if not c.gated else None)
    N = rec.pos
    gen = torch.Generator().manual_seed(seed)
    z = torch.cat([shadow.scores(rec.x[layer][s : min(s + 4096, N)]) for s in range(N - n_held, N, 4096)])
    y = torch.cat([unpack_bits(rec.y[layer][s : min(s + 4096, N)], n) for s in range(N - n_held, N, 4096)])
    return TrainResult(shadow, sample_quantiles(z[y], gen), sample_quantiles(z[~y], gen), float(y.float().mean()), 0.0)


def rates(rec: RecordingFFN, layer: int) -> Tensor:
    """(n,) float32: the share of the calibration tokens on which each neuron is labelled active."""
    n, N = rec.config.ffn_dims[layer], rec.pos
    counts = torch.zeros(n, dtype=torch.float64)
    for s in range(0, N, 4096):
        counts += unpack_bits(rec.y[layer][s : min(s + 4096, N)], n).sum(0, dtype=torch.float64)
    return (counts / max(N, 1)).float()


def expected_means(results: list[TrainResult], recall: float) -> dict[str, float]:
    """Held-out means over layers at the chosen thresholds: recall, precision, predicted share."""
    per_layer = [
        expected(r.pos_quantiles, r.neg_quantiles, r.pos_rate, threshold_for_recall(r.pos_quantiles, recall))
        for r in results
    ]
    k = len(results)
    return {
        "recall": round(sum(e["recall"] for e in per_layer) / k, 4),
        "precision": round(sum(e["precision"] for e in per_layer) / k, 4),
        "predicted_share": round(sum(e["predicted"] for e in per_layer) / k, 4),
    }


def calibrate_store(
    store: Store,
    dense: DenseWeights,
    ids: list[int],
    kind: str,
    rank: int,
    sparsity: float,
    recall: float,
    epochs: int,
    seed: int,
    chunk: int,
    heldout: float,
    batch: int,
    lr: float,
    progress: bool = True,
    started: float | None = None,
) -> dict[str, Any]:
    """Record, train (or quantize), save and record in the manifest the predictors of `store`
    calibrated on the token ids `ids` (arguments checked by the caller); returns the manifest
    entry written, with timings in seconds since `started` (default: now) under "seconds"."""
    t0 = time.perf_counter() if started is None else started
    keep = 1.0 - sparsity
    with torch.inference_mode():
        rec = record(store, dense, ids, keep, chunk, progress)
    t_record = time.perf_counter() - t0
    n_held = heldout_tokens(len(ids), heldout, chunk)
    if kind == "shadow":
        results = quantize_shadows(rec, store, n_held, seed, progress)
        rank, epochs = 0, 0
    else:
        results = train_lowrank(rec, n_held, rank, epochs, batch, lr, seed, store.dtype, progress)
        # the rank actually trained: train_layer caps it at the layer's width (min(rank, dim, n))
        rank = max(r.predictor.rank for r in results)
    assert rec.thresholds is not None
    for layer, r in enumerate(results):  # per-neuron activity (hot pinning reads it)
        r.rate = rates(rec, layer)
    meta = dict(
        kind=kind,
        rank=rank,
        keep=keep,
        sparsity=sparsity,
        tokens=len(ids),
        heldout_tokens=n_held,
        epochs=epochs,
        seed=seed,
        label=rec.kind,
        chunk=chunk,
        batch=batch,
        lr=lr,
    )
    path = save_predictors(store.path / PREDICTORS, results, recall, rec.thresholds, meta)
    del rec
    entry = {
        "file": PREDICTORS,
        "bytes": path.stat().st_size,
        **meta,
        "recall": recall,
        "expected": expected_means(results, recall),
    }
    _write_manifest_entry(store, entry)
    entry["seconds"] = {"record": round(t_record, 1), "total": round(time.perf_counter() - t0, 1)}
    return entry


def _write_manifest_entry(store: Store, entry: dict[str, Any]) -> None:
    """Record the predictors file just written (atomically, after it): its entry and, in a
    version-4 store, its size and CRC-32 among the manifest's files, with a new manifest checksum.
    The manifest is read again and checked (Store), so nothing changed meanwhile is blessed. Killed
    between the two renames, the store holds new predictors the manifest does not record: loading
    them is a StoreError naming predictors.safetensors, and calibrate can be run again."""
    m = Store(store.path).manifest
    m["predictors"] = entry
    if isinstance(m.get("files"), dict):
        m["files"][PREDICTORS] = file_entry(store.path / PREDICTORS)
    write_manifest(store.path, m)
