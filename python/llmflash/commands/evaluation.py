"""What `llmflash eval` measures: the sparsity predictors' cost in quality and saving in I/O.

On N tokens of held-out text (default: llmflash.commands.texts.heldout_text, text `llmflash
calibrate` does not read by default):
  - dense perplexity (every neuron, one batched pass) and, in the same pass, per layer the
    predictors' recall and precision against the true labels (the rule they were calibrated
    for: |act| over the layer's threshold, or act > 0 for ReLU models) and the predicted share;
  - "predictor only": perplexity with each token's FFN restricted to its predicted neurons (no
    window, no cache): the predictor's own damage;
  - flash at each memory budget: perplexity computed token by token through the KV cache (the
    neuron cache and its window are per-token state), with the strategy's counters: the share of
    the FFN read per token (bytes read, including gaps the planner bridged), the minimum that the
    missing bundles needed, the share the caches hold, and the hit rate.
The tables: llmflash.commands.eval.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..budget import parse_memory
from ..device import resolve_device
from ..errors import BudgetError, InvalidArgumentError, LlmflashError, check_int
from ..models.layers import linear
from ..models.transformer import Transformer
from ..sparsity import NextLayerGuess, Predictors, SameLayerGuess, make_source
from ..sparsity.labels import activations, label_kind, labels
from ..sparsity.neurons import in_original_ids, in_store_positions, order_inverse
from ..store import Store
from ..strategies import make_ffn
from ..strategies.dense import DenseFFN
from ..strategies.flash import check_window, model_bytes
from ..textfile import check_text_file, read_text_for_tokens
from ..threads import check_threads, set_threads
from .texts import heldout_text


def _perplexity(logits: Tensor, ids: Tensor) -> float:
    """exp(mean NLL of ids[1:] given logits[:-1])."""
    return math.exp(float(F.cross_entropy(logits[:-1].float(), ids[1:])))


class _ProbeFFN:
    """Dense FFN that, per layer, counts the predictors' hits against the true labels; with
    `restrict`, each token's FFN runs on its predicted neurons only."""

    def __init__(self, store: Store, predictors: Predictors | None, restrict: bool = False):
        self.dense = DenseFFN(store, dequantize=True)  # a quantized store: its float values (a measurement)
        self.config = store.config
        self.p = predictors
        self.restrict = restrict
        self.kind = label_kind(store.config)
        self.order = [None if L.order is None else torch.tensor(L.order, dtype=torch.long) for L in store.layers]
        self.inverse = [order_inverse(L.order) for L in store.layers]
        L = store.config.n_layers
        self.counts = torch.zeros(L, 4, dtype=torch.float64)  # tp, fp, fn, tokens x n

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        d = self.dense
        if self.config.n_experts:  # routed: the experts' own sum (no predictors to probe)
            return d(layer, x)
        act = activations(self.config, d.w1[layer], x, d.b1[layer])  # (T, n) store positions
        if self.p is not None:
            y = labels(self.kind, in_original_ids(act, self.inverse[layer]), float(self.p.label_thresholds[layer]))
            pred = self.p.predict(layer, x)  # (T, n) original ids
            self.counts[layer] += torch.tensor(
                [float((pred & y).sum()), float((pred & ~y).sum()), float((~pred & y).sum()), float(y.numel())],
                dtype=torch.float64,
            )
            if self.restrict:
                act = act * in_store_positions(pred, self.order[layer])  # back to store positions
        return linear(act, d.w2[layer])  # (T, D)

    def layer_table(self) -> list[dict[str, float]]:
        rows = []
        for i, (tp, fp, fn, total) in enumerate(self.counts.tolist()):
            rows.append(
                {
                    "layer": i,
                    "recall": tp / max(tp + fn, 1.0),
                    "precision": tp / max(tp + fp, 1.0),
                    "predicted_share": (tp + fp) / max(total, 1.0),
                    "label_share": (tp + fn) / max(total, 1.0),
                }
            )
        return rows


class _Counting:
    """A wanted-set source that counts how many neurons it names."""

    def __init__(self, source: Any, ffn_dims: list[int]):
        self.source, self.total, self.named, self.calls = source, sum(ffn_dims), 0, 0
        self.n_layers = len(ffn_dims)
        self.sticky = bool(getattr(source, "sticky", False))
        self.hot = getattr(source, "hot", None)
        for hook in ("ahead", "early"):  # lookahead guesses pass through, uncounted
            if hasattr(source, hook):
                setattr(self, hook, getattr(source, hook))
                self.ahead_exact = getattr(source, "ahead_exact", False)

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        return self._count(self.source(layer, x))

    def select(self, layer: int, x: Tensor, cached: Tensor) -> Tensor:
        return self._count(self.source.select(layer, x, cached))

    def _count(self, ids: Tensor) -> Tensor:
        self.named += len(ids)
        self.calls += 1
        return ids

    def nbytes(self) -> int:
        """The wrapped source's DRAM (the flash budget counts the predictors' weights)."""
        return int(getattr(self.source, "nbytes", lambda: 0)())

    def share(self) -> float:
        steps = self.calls / self.n_layers
        return self.named / (steps * self.total) if steps else float("nan")


def evaluate(
    store_path: str | os.PathLike[str],
    text: str | None = None,
    tokens: int = 512,
    memories: Sequence[str] = ("0.75x", "0.5x"),
    window: int = 4,
    sparsity: str = "predictor",
    threads: int | None = 2,
    progress: bool = True,
    lookahead: str | None = None,
    hot: float = 0.0,
    text_file: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Dense and flash perplexity over `tokens` tokens of `text`, or of the file `text_file` (read
    only as far as those tokens need), or of held-out documentation text. Flash runs on `device`
    (llmflash.device; default the CPU); the dense reference pass, on the CPU."""
    threads = check_threads(threads)
    dev = resolve_device(device)
    check_int("tokens", tokens, 2)
    if text_file is not None:
        check_text_file(text_file)
    if lookahead not in (None, "layer", "attention"):
        raise InvalidArgumentError(f"lookahead must be None, 'layer' or 'attention', got {lookahead!r}")
    window = check_window(window)
    for mem in memories:  # syntax only here; a budget too small for this store is a row of its own
        parse_memory(mem, 1 << 40)
    set_threads(threads)
    store = Store(store_path)
    ids = _token_ids(store, text, text_file, tokens)
    moe = bool(store.config.n_experts)  # the router names the experts: no neuron source
    if moe and hot:
        raise InvalidArgumentError("--hot pins neurons: a mixture-of-experts store reads whole experts", store.path)
    source = None if moe else make_source(sparsity, store, hot=hot)
    predictors = source if isinstance(source, Predictors) else None
    out: dict[str, Any] = {
        "store": str(store.path),
        "tokens": len(ids),
        "window": window,
        "sparsity": sparsity,
        "lookahead": lookahead,
        "hot": hot,
        "device": str(dev),
    }
    if predictors is not None:
        out["predictor"] = {
            k: predictors.meta.get(k) for k in ("kind", "rank", "keep", "tokens", "epochs", "seed", "label")
        }
        out["predictor"]["recall_target"] = predictors.recall
        out["predictor"]["stay"] = predictors.stay
        out["predictor"]["bytes"] = predictors.nbytes()
    with torch.inference_mode():
        _dense_pass(store, ids, predictors, out)
    guess = {"layer": NextLayerGuess, "attention": SameLayerGuess}.get(lookahead or "")
    out["flash"] = [
        _flash_row(
            store,
            ids,
            mem,
            window,
            guess(source) if guess and not moe else source,
            lookahead,
            progress,
            out["dense"]["ppl"],
            dev,
        )
        for mem in memories
    ]
    return out


def _token_ids(store: Store, text: str | None, text_file: str | os.PathLike[str] | None, tokens: int) -> Tensor:
    c = store.config
    tok = store.tokenizer()
    if tok is None:
        raise LlmflashError("the store has no tokenizer.json, so it cannot tokenize evaluation text", store.path)
    if text_file is not None:
        text = read_text_for_tokens(text_file, tok, tokens)
    ids_list = [i for i in tok.encode(text if text is not None else heldout_text()).ids if 0 <= i < c.vocab_size]
    ids_list = ids_list[: min(tokens, c.max_positions)]
    if len(ids_list) < 2:
        raise LlmflashError(f"evaluation text gave {len(ids_list)} tokens; need at least 2")
    return torch.tensor(ids_list, dtype=torch.long)


def _dense_pass(store: Store, ids: Tensor, predictors: Predictors | None, out: dict[str, Any]) -> None:
    """Dense perplexity, and with predictors their measured recall and precision (per layer and
    overall) and the "predictor only" perplexity, into `out`."""
    N = len(ids)
    probe = _ProbeFFN(store, predictors)
    model = Transformer.from_store(store, probe)
    dense_ppl = _perplexity(model.forward(ids, model.new_cache(N)), ids)
    out["dense"] = {"ppl": dense_ppl}
    if predictors is None:
        return
    out["layers"] = probe.layer_table()
    tp, fp, fn, total = probe.counts.sum(0).tolist()
    out["predictor"].update(
        {
            "recall": tp / max(tp + fn, 1),
            "precision": tp / max(tp + fp, 1),
            "predicted_share": (tp + fp) / max(total, 1),
        }
    )
    probe.restrict = True  # the same dense weights, each token's FFN on its predicted neurons only
    out["predictor_only"] = {"ppl": _perplexity(model.forward(ids, model.new_cache(N)), ids)}
    out["predictor_only"]["ratio"] = out["predictor_only"]["ppl"] / dense_ppl


def _flash_row(
    store: Store,
    ids: Tensor,
    mem: str,
    window: int,
    source: Any,
    lookahead: str | None,
    progress: bool,
    dense_ppl: float,
    device: torch.device,
) -> dict[str, Any]:
    """Flash at the budget `mem`, token by token: perplexity and the strategy's counters."""
    from tqdm import tqdm

    c, N = store.config, len(ids)
    moe = bool(c.n_experts)
    counting = None if moe else _Counting(source, c.ffn_dims)
    try:
        ffn = make_ffn(
            "flash",
            store,
            device,
            memory=mem,
            window=window,
            lookahead=lookahead or False,
            **({} if counting is None else {"sparsity": counting}),
        )
    except BudgetError as e:  # this budget cannot hold the resident part
        return {"memory": mem, "error": str(e)}
    model = Transformer.from_store(store, ffn, device=device)
    cache = model.new_cache(N)
    nll = 0.0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for t in tqdm(range(N - 1), desc=f"flash {mem}", unit="tok", disable=not progress):
            logits = model.forward(ids[t : t + 1], cache)[-1]
            nll -= float(F.log_softmax(logits.float(), dim=-1)[ids[t + 1]])
    elapsed = time.perf_counter() - t0
    s = ffn.stats()
    steps = max(s.get("steps", N - 1), 1.0)
    ppl = math.exp(nll / (N - 1))
    hits, misses = s.get("hits", 0.0), s.get("misses", 0.0)
    ffn_bytes, n_total = model_bytes(store)[1], sum(c.ffn_dims)
    row = {
        "memory": mem,
        "ppl": ppl,
        "ratio": ppl / dense_ppl,
        # named + hot; a mixture of experts: its top-k of E experts per layer
        "wanted_share": c.experts_per_token / c.n_experts
        if counting is None
        else counting.share() + s.get("hot_neurons", 0.0) / n_total,
        "read_share": s.get("bytes_read", 0.0) / (steps * ffn_bytes),
        "useful_share": s.get("bytes_useful", 0.0) / (steps * ffn_bytes),
        # the read requests per token and their mean size (neuron placement's effect)
        "requests_per_token": s.get("requests", 0.0) / steps,
        "kb_per_request": s.get("bytes_read", 0.0) / max(s.get("requests", 0.0), 1.0) / 1e3,
        # the FFN held in DRAM: the caches plus the pinned hot neurons
        "cached_share": (s.get("cache_capacity_neurons", 0.0) + s.get("hot_neurons", 0.0)) / n_total,
        "hot_share": s.get("hot_neurons", 0.0) / n_total,
        "hit_rate": hits / max(hits + misses, 1.0),
        "ms_per_token": elapsed * 1e3 / (N - 1),
    }
    if moe:  # whole experts: how many a token reads, what share the caches hold, how many hit
        row["experts_read_per_token"] = s["experts_read_per_token"]
        row["cached_share"] = s["cache_capacity_experts"] / (c.n_experts * c.n_layers)
        row["hit_rate"] = s["expert_hit_rate"]
    if lookahead:
        # neurons the guesses read during the layer before, and those they missed (read at
        # the layer itself, not hidden behind compute), as shares of the FFN per token
        row.update(
            {
                "ahead_read_share": s.get("ahead_read", 0.0) / (steps * n_total),
                "late_read_share": s.get("ahead_missed", 0.0) / (steps * n_total),
                "guess_recall": s.get("guess_right", 0.0) / max(s.get("wanted_named", 0.0), 1.0),
                "guess_precision": s.get("guess_right", 0.0) / max(s.get("guess_named", 0.0), 1.0),
            }
        )
    return row
