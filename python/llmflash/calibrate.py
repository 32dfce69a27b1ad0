"""`llmflash calibrate`: train the sparsity predictors of a store (llmflash.predictor).

    llmflash calibrate STORE [--text FILE ...] [--tokens N] [--kind lowrank|shadow] [--rank R]
                             [--sparsity S] [--recall T] [--epochs E] [--seed S]

1. Run the dense model (float32 activations) over calibration text in chunks of `--chunk`
   tokens, a fresh KV cache per chunk, through a recording FFN that keeps, per layer, the FFN
   input x (in the store dtype: what the predictor sees at run time) and the labels, bit-packed
   (SmolLM2, 16k tokens: x is 570 MB, labels 94 MB). The magnitude threshold of each layer's
   labels is the (1 - keep) quantile of |act| over the first THRESHOLD_TOKENS tokens (whole
   chunks; a sample of their T x n values), fixed before any label is written, so every token
   is labelled by the same rule.
2. Train each layer's predictor (balanced BCE, Adam, `--epochs` passes) on all but the last
   `--heldout` share of tokens; those (whole chunks of different text) choose the layer's
   logit threshold for the target recall and give the quantile tables stored with it.
3. Write predictors.safetensors atomically (temporary file + os.replace) and record it in the
   manifest ("predictors": {file, bytes, rank, ...}; in a version-4 store also its size and CRC-32
   under "files", and the manifest's new checksum), also by an atomic replace.

Default text: the first CALIBRATION_CHARS characters of CPython's documentation topics
(llmflash.bench.calibration_text). `llmflash eval` defaults to the text after them, so
calibration and evaluation text are disjoint by construction.
Deterministic for a given seed (torch's CPU kernels with a fixed thread count).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .cli_args import Parser
from .errors import InvalidArgumentError, LlmflashError
from .models.layers import linear
from .textfile import check_text_file
from .threads import check_threads, set_threads
from .predictor import TrainResult, activations, label_kind, labels, pack_bits, threshold_for_recall
from .predictor_file import save_predictors
from .store.checksums import file_entry
from .defaults import store_or_default
from .store import PREDICTORS, Store, write_manifest

THRESHOLD_TOKENS = 1024         # the label thresholds come from |act| over the first 1024 tokens
CALIBRATION_CHARS = 360_000      # pydoc topics text [0, 360000) calibrates; eval reads from here on
DEFAULTS = dict(tokens=16384, rank=128, sparsity=0.5, recall=0.99, epochs=2, seed=0, chunk=512,
                heldout=0.125, batch=512, lr=3e-3)


def default_text() -> str:
    from .bench import calibration_text

    return calibration_text(CALIBRATION_CHARS, offset=0)


class RecordingFFN:
    """The dense FFN (DenseFFN's weights and math) that also records, per layer, the FFN input
    and the bit-packed labels of each token, in original neuron ids."""

    def __init__(self, store: Store, capacity: int, keep: float, threshold_tokens: int = 512):
        from .strategies.dense import DenseFFN

        self.dense = DenseFFN(store)
        c = self.config = store.config
        self.kind = label_kind(c)
        self.keep = keep
        self.capacity = capacity
        self.x = [torch.empty(capacity, c.dim, dtype=store.dtype) for _ in range(c.n_layers)]
        self.y = [torch.empty(capacity, (n + 7) // 8, dtype=torch.uint8) for n in c.ffn_dims]
        self.inverse: list[Tensor | None] = []          # store position -> original id permutation
        for L in store.layers:
            self.inverse.append(None if L.order is None else torch.tensor(L.order, dtype=torch.long))
        self.thresholds: list[float] | None = None if self.kind == "magnitude" else [0.0] * c.n_layers
        self.threshold_tokens = threshold_tokens
        self._pending: list[list[Tensor]] = [[] for _ in range(c.n_layers)]   # |act| until thresholds
        self.pos = 0                                    # first row of the current chunk

    def _activations(self, layer: int, x: Tensor) -> Tensor:
        d = self.dense
        act = activations(self.config, d.w1[layer], x, d.b1[layer])         # (T, n), store positions
        inv = self.inverse[layer]
        if inv is not None:                                                 # -> original neuron ids
            out = torch.empty_like(act)
            out[:, inv] = act
            act = out
        return act

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        T = x.shape[0]
        act = self._activations(layer, x)                                   # (T, n) float32
        rows = slice(self.pos, self.pos + T)
        self.x[layer][rows] = x
        if self.thresholds is None:
            self._pending[layer].append(act.abs())
        else:
            self.y[layer][rows] = pack_bits(labels(self.kind, act, self.thresholds[layer]))
        d = self.dense
        h = act if self.inverse[layer] is None else act[:, self.inverse[layer]]
        return linear(h, d.w2[layer])                                       # (T, D)

    def end_chunk(self, T: int) -> None:
        """Advance past a chunk of T tokens; fix the label thresholds once enough tokens were seen."""
        self.pos += T
        if self.thresholds is None and self.pos >= min(self.threshold_tokens, self.capacity):
            gen = torch.Generator().manual_seed(0)
            self.thresholds = []
            for layer, parts in enumerate(self._pending):
                a = torch.cat(parts).flatten()
                if a.numel() > 1 << 22:
                    a = a[torch.randint(a.numel(), (1 << 22,), generator=gen)]
                self.thresholds.append(float(torch.quantile(a.double(), 1.0 - self.keep)))
                start = 0
                for p in parts:                                            # label what was held back
                    self.y[layer][start:start + p.shape[0]] = pack_bits(p > self.thresholds[-1])
                    start += p.shape[0]
            self._pending = [[] for _ in self._pending]


def _token_ids(store: Store, texts: list[str]) -> list[int]:
    tok = store.tokenizer()
    if tok is None:
        raise LlmflashError("the store has no tokenizer.json, so it cannot tokenize calibration text", store.path)
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids
    return [i for i in ids if 0 <= i < store.config.vocab_size]


def record(store: Store, ids: list[int], keep: float, chunk: int, progress: bool = True) -> RecordingFFN:
    """Run the dense model over `ids` in chunks (fresh KV cache each), recording x and labels."""
    from tqdm import tqdm

    from .models.transformer import Transformer

    chunk = max(1, min(chunk, store.config.max_positions))
    rec = RecordingFFN(store, len(ids), keep, threshold_tokens=max(chunk, THRESHOLD_TOKENS))
    model = Transformer.from_store(store, rec)
    with tqdm(total=len(ids), desc="record", unit="tok", disable=not progress) as bar:
        for s in range(0, len(ids), chunk):
            piece = torch.tensor(ids[s:s + chunk], dtype=torch.long)
            model.forward(piece, model.new_cache(piece.numel()), last_only=True)
            rec.end_chunk(piece.numel())
            bar.update(piece.numel())
    rec.end_chunk(0)
    return rec


def calibrate(store_path: str | os.PathLike[str], texts: list[str] | None = None, tokens: int = DEFAULTS["tokens"],
              rank: int = DEFAULTS["rank"], sparsity: float = DEFAULTS["sparsity"],
              recall: float = DEFAULTS["recall"], epochs: int = DEFAULTS["epochs"], seed: int = DEFAULTS["seed"],
              chunk: int = DEFAULTS["chunk"], heldout: float = DEFAULTS["heldout"], batch: int = DEFAULTS["batch"],
              lr: float = DEFAULTS["lr"], threads: int | None = 2, progress: bool = True,
              kind: str = "lowrank") -> dict[str, Any]:
    """Calibrate the store's predictors; returns the manifest entry written (with timings).
    kind "lowrank" trains the paper's d -> R -> n predictors; "shadow" quantizes the FFN's own
    gate/up rows to 4 bits (llmflash.shadow: nothing to train, thresholds as for lowrank)."""
    from tqdm import tqdm

    if kind not in ("lowrank", "shadow"):
        raise InvalidArgumentError(f"kind must be lowrank or shadow, got {kind!r}")

    if not 0.0 <= sparsity < 1.0:
        raise InvalidArgumentError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < recall <= 1.0:
        raise InvalidArgumentError(f"recall must be in (0, 1], got {recall}")
    if not 0.0 < heldout < 1.0:
        raise InvalidArgumentError(f"heldout must be in (0, 1), got {heldout}")
    if not 0.0 < lr < float("inf"):
        raise InvalidArgumentError(f"lr must be a finite number > 0, got {lr}")
    if tokens < 2 or rank < 1 or epochs < 0 or chunk < 1 or batch < 1:
        raise InvalidArgumentError("tokens >= 2, rank >= 1, epochs >= 0, chunk >= 1 and batch >= 1 are required, got "
                                   f"tokens {tokens}, rank {rank}, epochs {epochs}, chunk {chunk}, batch {batch}")
    set_threads(check_threads(threads))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    store = Store(store_path)
    c = store.config
    ids = _token_ids(store, texts if texts is not None else [default_text()])[:tokens]
    if len(ids) < 2:
        raise LlmflashError(f"calibration text gave {len(ids)} tokens; need at least 2")
    keep = 1.0 - sparsity
    with torch.inference_mode():
        rec = record(store, ids, keep, chunk, progress)
    t_record = time.perf_counter() - t0
    N = len(ids)
    # hold out whole chunks from the end: different text from what the predictor trains on
    n_held = max(1, int(round(N * heldout)))
    aligned = -(-n_held // chunk) * chunk
    if N - aligned >= aligned:
        n_held = aligned
    n_held = min(n_held, N - 1)
    steps = epochs * max(1, (N - n_held) // min(batch, N - n_held))
    results: list[TrainResult] = []
    if kind == "shadow":
        for layer in tqdm(range(c.n_layers), desc="shadow", unit="layer", disable=not progress):
            results.append(_shadow(rec, store, layer, n_held, seed * 1000 + layer))
        rank, epochs = 0, 0
    else:
        with tqdm(total=steps * c.n_layers, desc="train", unit="step", disable=not progress) as bar:
            for layer in range(c.n_layers):
                bar.set_postfix(layer=layer)
                results.append(_train(rec, layer, rank, n_held, epochs, batch, lr, seed * 1000 + layer, store.dtype, bar))
        # the rank actually trained: train_layer caps it at the layer's width (min(rank, dim, n))
        rank = max(r.predictor.rank for r in results)
    assert rec.thresholds is not None
    for layer, r in enumerate(results):                 # per-neuron activity (hot pinning reads it)
        r.rate = _rates(rec, layer)
    meta = dict(kind=kind, rank=rank, keep=keep, sparsity=sparsity, tokens=N, heldout_tokens=n_held, epochs=epochs,
                seed=seed, label=rec.kind, chunk=chunk, batch=batch, lr=lr)
    path = save_predictors(store.path / PREDICTORS, results, recall, rec.thresholds, meta)
    del rec
    entry = {"file": PREDICTORS, "bytes": path.stat().st_size, **meta, "recall": recall,
             "expected": _expected(results, recall)}
    _write_manifest_entry(store, entry)
    entry["seconds"] = {"record": round(t_record, 1), "total": round(time.perf_counter() - t0, 1)}
    return entry


def _train(rec: RecordingFFN, layer: int, rank: int, n_held: int, epochs: int, batch: int, lr: float,
           seed: int, dtype: torch.dtype, bar: Any) -> TrainResult:
    from .predictor import train_layer

    n = rec.config.ffn_dims[layer]
    return train_layer(rec.x[layer], rec.y[layer], n, rank, n_held, epochs=epochs, batch=batch, lr=lr, seed=seed,
                       dtype=dtype, progress=bar)


def _shadow(rec: RecordingFFN, store: Store, layer: int, n_held: int, seed: int) -> TrainResult:
    """The 4-bit shadow of one layer's gate/up rows (original neuron order, as the labels), and
    its held-out score quantiles."""
    from .predictor import _sample_quantiles, unpack_bits
    from .shadow import ShadowLayer

    d, c = rec.dense, rec.config
    n = c.ffn_dims[layer]
    w1, b1 = d.w1[layer], d.b1[layer]
    order = store.layers[layer].order
    if order is not None:                                  # store positions -> original ids
        back = torch.argsort(torch.tensor(order, dtype=torch.long))
        w1 = torch.cat([w1[:n][back], w1[n:][back]]) if c.gated else w1[back]
        b1 = None if b1 is None else b1[back]
    shadow = ShadowLayer.from_weights(w1, c.gated, b1 if not c.gated else None)
    N = rec.pos
    gen = torch.Generator().manual_seed(seed)
    z = torch.cat([shadow.scores(rec.x[layer][s:min(s + 4096, N)]) for s in range(N - n_held, N, 4096)])
    y = torch.cat([unpack_bits(rec.y[layer][s:min(s + 4096, N)], n) for s in range(N - n_held, N, 4096)])
    return TrainResult(shadow, _sample_quantiles(z[y], gen), _sample_quantiles(z[~y], gen), float(y.float().mean()), 0.0)


def _rates(rec: RecordingFFN, layer: int) -> Tensor:
    """(n,) float32: the share of the calibration tokens on which each neuron is labelled active."""
    from .predictor import unpack_bits

    n, N = rec.config.ffn_dims[layer], rec.pos
    counts = torch.zeros(n, dtype=torch.float64)
    for s in range(0, N, 4096):
        counts += unpack_bits(rec.y[layer][s:min(s + 4096, N)], n).sum(0, dtype=torch.float64)
    return (counts / max(N, 1)).float()


def _expected(results: list[TrainResult], recall: float) -> dict[str, float]:
    """Held-out means over layers at the chosen thresholds: recall, precision, predicted share."""
    from .predictor import share_above

    rs, ps, sh = [], [], []
    for r in results:
        t = threshold_for_recall(r.pos_quantiles, recall)
        tpr, fpr = share_above(r.pos_quantiles, t), share_above(r.neg_quantiles, t)
        pred = r.pos_rate * tpr + (1 - r.pos_rate) * fpr
        rs.append(tpr)
        ps.append(r.pos_rate * tpr / pred if pred > 0 else 1.0)
        sh.append(pred)
    k = len(results)
    return {"recall": round(sum(rs) / k, 4), "precision": round(sum(ps) / k, 4), "predicted_share": round(sum(sh) / k, 4)}


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


def main(argv: Sequence[str]) -> int:
    p = Parser(prog="llmflash calibrate", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", default=None,
                   help="store folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", action="append", metavar="FILE",
                   help="calibration text file(s), repeatable (default: CPython's documentation topics, "
                        f"its first {CALIBRATION_CHARS} characters)")
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="calibration tokens (default %(default)s)")
    p.add_argument("--kind", choices=("lowrank", "shadow"), default="lowrank",
                   help="lowrank: the paper's trained d -> R -> n predictors (default); shadow: the FFN's gate/up "
                        "rows at 4 bits, far closer to the oracle on small SwiGLU models at 1/6 of the FFN's size")
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="predictor rank R (default %(default)s)")
    p.add_argument("--sparsity", type=float, default=DEFAULTS["sparsity"],
                   help="SwiGLU/GELU labels: share of (token, neuron) pairs labelled inactive by the per-layer "
                        "|act| threshold; ReLU models ignore it (act > 0). Default %(default)s")
    p.add_argument("--recall", type=float, default=DEFAULTS["recall"],
                   help="target recall of the per-layer thresholds on held-out tokens (default %(default)s: "
                        "SmolLM2 needs about 0.99 to stay within 3%% of dense perplexity)")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training passes (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--chunk", type=int, default=DEFAULTS["chunk"], help="tokens per dense pass (default %(default)s)")
    p.add_argument("--heldout", type=float, default=DEFAULTS["heldout"],
                   help="share of tokens held out to choose thresholds (default %(default)s)")
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="mini-batch tokens (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, at most 8 per core (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(list(argv))
    check_threads(a.threads)                 # before the default model is converted
    path = store_or_default(a.store)
    texts = None
    if a.text:
        texts = []
        for f in a.text:
            check_text_file(f, "calibration text")
            try:
                texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
            except OSError as e:
                raise LlmflashError(f"cannot read calibration text: {e.strerror}", f) from None
    entry = calibrate(path, texts, tokens=a.tokens, rank=a.rank, sparsity=a.sparsity, recall=a.recall,
                      epochs=a.epochs, seed=a.seed, chunk=a.chunk, heldout=a.heldout, batch=a.batch,
                      threads=a.threads, progress=not a.quiet, kind=a.kind)
    e = entry["expected"]
    what = "4-bit shadow" if a.kind == "shadow" else f"rank {entry['rank']}"
    if a.kind != "shadow" and entry["rank"] != a.rank:
        what += f" (--rank {a.rank} capped at the model's width)"
    print(f"wrote {Path(path) / PREDICTORS}: {entry['tokens']} tokens, {what}, "
          f"held-out recall {e['recall']:.3f}, precision {e['precision']:.3f}, "
          f"predicted share {e['predicted_share']:.3f}; {entry['seconds']['total']:.0f} s", file=sys.stderr)
    return 0
