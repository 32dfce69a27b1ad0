"""`llmflash eval`: what the sparsity predictors cost in quality and save in I/O.

    llmflash eval STORE [--text FILE] [--tokens N] [--memory M ...] [--window K]
                        [--sparsity predictor[:RECALL[/STAY]]] [--hot SHARE]
                        [--lookahead layer|attention] [--json]

On N tokens of held-out text (default: CPython's documentation topics that start at or after
character CALIBRATION_CHARS, text `llmflash calibrate` does not read by default):
  - dense perplexity (every neuron, one batched pass) and, in the same pass, per layer the
    predictors' recall and precision against the true labels (the rule they were calibrated
    for: |act| over the layer's threshold, or act > 0 for ReLU models) and the predicted share;
  - "predictor only": perplexity with each token's FFN restricted to its predicted neurons (no
    window, no cache): the predictor's own damage;
  - flash at each memory budget: perplexity computed token by token through the KV cache (the
    neuron cache and its window are per-token state), with the strategy's counters: the share of
    the FFN read per token (bytes read, including gaps the planner bridged), the minimum that the
    missing bundles needed, the share the caches hold, and the hit rate.
Prints tables, or JSON with --json.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .cli_args import Parser
from .budget import parse_memory
from .errors import BudgetError, InvalidArgumentError, LlmflashError, check_int
from .models.layers import linear
from .textfile import check_text_file, read_text_for_tokens
from .threads import check_threads, set_threads
from .predictor import Predictors, activations, label_kind, labels
from .defaults import store_or_default
from .store import Store


def heldout_text(n_chars: int = 200_000) -> str:
    """Documentation text disjoint from calibrate's default: the topics (joined as in
    llmflash.bench.calibration_text) that start at or after CALIBRATION_CHARS, so evaluation
    begins on a topic's first line rather than in the middle of the one calibration cut."""
    from pydoc_data.topics import topics

    from .bench import calibration_text
    from .calibrate import CALIBRATION_CHARS

    start = 0
    for key in sorted(topics):
        if start >= CALIBRATION_CHARS:
            break
        start += len(topics[key]) + 2                     # "\n\n" joins the topics
    return calibration_text(n_chars, offset=max(start, CALIBRATION_CHARS))


def _perplexity(logits: Tensor, ids: Tensor) -> float:
    """exp(mean NLL of ids[1:] given logits[:-1])."""
    return math.exp(float(F.cross_entropy(logits[:-1].float(), ids[1:])))


class _ProbeFFN:
    """Dense FFN that, per layer, counts the predictors' hits against the true labels; with
    `restrict`, each token's FFN runs on its predicted neurons only."""

    def __init__(self, store: Store, predictors: Predictors | None, restrict: bool = False):
        from .strategies.dense import DenseFFN

        self.dense = DenseFFN(store)
        self.config = store.config
        self.p = predictors
        self.restrict = restrict
        self.kind = label_kind(store.config)
        self.inverse = [None if L.order is None else torch.tensor(L.order, dtype=torch.long) for L in store.layers]
        L = store.config.n_layers
        self.counts = torch.zeros(L, 4, dtype=torch.float64)   # tp, fp, fn, tokens x n

    def __call__(self, layer: int, x: Tensor) -> Tensor:
        d = self.dense
        act = activations(self.config, d.w1[layer], x, d.b1[layer])        # (T, n) store positions
        inv = self.inverse[layer]
        if self.p is not None:
            a = act
            if inv is not None:
                a = torch.empty_like(act)
                a[:, inv] = act                                             # original ids
            y = labels(self.kind, a, float(self.p.label_thresholds[layer]))
            pred = self.p.predict(layer, x)
            self.counts[layer] += torch.tensor([float((pred & y).sum()), float((pred & ~y).sum()),
                                                float((~pred & y).sum()), float(y.numel())], dtype=torch.float64)
            if self.restrict:
                keep = pred if inv is None else pred[:, inv]
                act = act * keep
        return linear(act, d.w2[layer])                                     # (T, D)

    def layer_table(self) -> list[dict[str, float]]:
        rows = []
        for i, (tp, fp, fn, total) in enumerate(self.counts.tolist()):
            rows.append({"layer": i, "recall": tp / max(tp + fn, 1.0), "precision": tp / max(tp + fp, 1.0),
                         "predicted_share": (tp + fp) / max(total, 1.0), "label_share": (tp + fn) / max(total, 1.0)})
        return rows


class _Counting:
    """A wanted-set source that counts how many neurons it names."""

    def __init__(self, source: Any, ffn_dims: list[int]):
        self.source, self.total, self.named, self.calls = source, sum(ffn_dims), 0, 0
        self.n_layers = len(ffn_dims)
        self.sticky = bool(getattr(source, "sticky", False))
        self.hot = getattr(source, "hot", None)
        for hook in ("ahead", "early"):          # lookahead guesses pass through, uncounted
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


def evaluate(store_path: str | os.PathLike[str], text: str | None = None, tokens: int = 512,
             memories: Sequence[str] = ("0.75x", "0.5x"), window: int = 4, sparsity: str = "predictor",
             threads: int | None = 2, progress: bool = True, lookahead: str | None = None,
             hot: float = 0.0, text_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Dense and flash perplexity over `tokens` tokens of `text`, or of the file `text_file` (read
    only as far as those tokens need), or of held-out documentation text."""
    from tqdm import tqdm

    from .models.transformer import Transformer
    from .strategies import make_ffn
    from .sparsity import NextLayerGuess, SameLayerGuess
    from .sparsity import make_source
    from .strategies.flash import check_window, model_bytes

    threads = check_threads(threads)
    check_int("tokens", tokens, 2)
    if text_file is not None:
        check_text_file(text_file)
    if lookahead not in (None, "layer", "attention"):
        raise InvalidArgumentError(f"lookahead must be None, 'layer' or 'attention', got {lookahead!r}")
    window = check_window(window)
    for mem in memories:            # syntax only here; a budget too small for this store is a row of its own
        parse_memory(mem, 1 << 40)
    set_threads(threads)
    store = Store(store_path)
    c = store.config
    tok = store.tokenizer()
    if tok is None:
        raise LlmflashError("the store has no tokenizer.json, so it cannot tokenize evaluation text", store.path)
    if text_file is not None:
        text = read_text_for_tokens(text_file, tok, tokens)
    ids_list = [i for i in tok.encode(text if text is not None else heldout_text()).ids if 0 <= i < c.vocab_size]
    ids_list = ids_list[:min(tokens, c.max_positions)]
    if len(ids_list) < 2:
        raise LlmflashError(f"evaluation text gave {len(ids_list)} tokens; need at least 2")
    ids = torch.tensor(ids_list, dtype=torch.long)
    N = len(ids_list)
    source = make_source(sparsity, store, hot=hot)
    predictors = source if isinstance(source, Predictors) else None
    out: dict[str, Any] = {"store": str(store.path), "tokens": N, "window": window, "sparsity": sparsity,
                           "lookahead": lookahead, "hot": hot}
    if predictors is not None:
        out["predictor"] = {k: predictors.meta.get(k) for k in ("kind", "rank", "keep", "tokens", "epochs", "seed", "label")}
        out["predictor"]["recall_target"] = predictors.recall
        out["predictor"]["stay"] = predictors.stay
        out["predictor"]["bytes"] = predictors.nbytes()

    with torch.inference_mode():
        probe = _ProbeFFN(store, predictors)
        model = Transformer.from_store(store, probe)
        dense_ppl = _perplexity(model.forward(ids, model.new_cache(N)), ids)
        out["dense"] = {"ppl": dense_ppl}
        if predictors is not None:
            out["layers"] = probe.layer_table()
            tp, fp, fn, total = probe.counts.sum(0).tolist()
            out["predictor"].update({"recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
                                     "predicted_share": (tp + fp) / max(total, 1)})
            only = _ProbeFFN(store, predictors, restrict=True)
            model.ffn = only
            out["predictor_only"] = {"ppl": _perplexity(model.forward(ids, model.new_cache(N)), ids)}
            out["predictor_only"]["ratio"] = out["predictor_only"]["ppl"] / dense_ppl
        del probe, model

    ffn_bytes = model_bytes(store)[1]
    n_total = sum(c.ffn_dims)
    out["flash"] = []
    for mem in memories:
        guess = {"layer": NextLayerGuess, "attention": SameLayerGuess}.get(lookahead or "")
        counting = _Counting(guess(source) if guess else source, c.ffn_dims)
        try:
            ffn = make_ffn("flash", store, memory=mem, window=window, sparsity=counting, lookahead=lookahead or False)
        except BudgetError as e:                  # this budget cannot hold the resident part
            out["flash"].append({"memory": mem, "error": str(e)})
            continue
        model = Transformer.from_store(store, ffn)
        cache = model.new_cache(N)
        nll = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for t in tqdm(range(N - 1), desc=f"flash {mem}", unit="tok", disable=not progress):
                logits = model.forward(ids[t:t + 1], cache)[-1]
                nll -= float(F.log_softmax(logits.float(), dim=-1)[ids[t + 1]])
        elapsed = time.perf_counter() - t0
        s = ffn.stats()
        steps = max(s.get("steps", N - 1), 1.0)
        ppl = math.exp(nll / (N - 1))
        hits, misses = s.get("hits", 0.0), s.get("misses", 0.0)
        out["flash"].append({
            "memory": mem, "ppl": ppl, "ratio": ppl / dense_ppl,
            "wanted_share": counting.share() + s.get("hot_neurons", 0.0) / n_total,   # named + hot
            "read_share": s.get("bytes_read", 0.0) / (steps * ffn_bytes),
            "useful_share": s.get("bytes_useful", 0.0) / (steps * ffn_bytes),
            # the FFN held in DRAM: the caches plus the pinned hot neurons
            "cached_share": (s.get("cache_capacity_neurons", 0.0) + s.get("hot_neurons", 0.0)) / n_total,
            "hot_share": s.get("hot_neurons", 0.0) / n_total,
            "hit_rate": hits / max(hits + misses, 1.0),
            "ms_per_token": elapsed * 1e3 / (N - 1),
        })
        if lookahead:
            # neurons the guesses read during the layer before, and those they missed (read at
            # the layer itself, not hidden behind compute), as shares of the FFN per token
            out["flash"][-1].update({"ahead_read_share": s.get("ahead_read", 0.0) / (steps * n_total),
                                     "late_read_share": s.get("ahead_missed", 0.0) / (steps * n_total),
                                     "guess_recall": s.get("guess_right", 0.0) / max(s.get("wanted_named", 0.0), 1.0),
                                     "guess_precision": s.get("guess_right", 0.0) / max(s.get("guess_named", 0.0), 1.0)})
        del ffn, model, cache
    return out


def format_report(r: dict[str, Any]) -> str:
    lines = [f"{r['store']}: {r['tokens']} tokens, window {r['window']}, sparsity {r['sparsity']}"
             + (f", --hot {r['hot']}" if r.get("hot") else "")]
    p = r.get("predictor")
    if p:
        kind = "4-bit shadow" if p.get("kind") == "shadow" else f"rank {p['rank']}"
        lines.append(f"predictors: {kind}, keep {p['keep']}, {p['tokens']} calibration tokens, "
                     f"recall target {p['recall_target']}"
                     + (f" (cached neurons stay at {p['stay']})" if p.get("stay") is not None else "")
                     + f", {p['bytes'] / 1e6:.1f} MB; measured recall "
                     f"{p['recall']:.3f}, precision {p['precision']:.3f}, predicted {p['predicted_share']:.1%} "
                     "of (token, neuron) pairs")
    lines.append("")
    head = f"{'':<18}{'ppl':>9}{'x dense':>9}{'wanted':>9}{'bytes/tok':>10}{'neurons/tok':>12}{'cached':>8}{'hits':>7}{'ms/tok':>8}"
    lines.append(head)
    d = r["dense"]["ppl"]
    lines.append(f"{'dense':<18}{d:>9.3f}{1.0:>9.3f}{'100%':>9}")
    if "predictor_only" in r:
        q = r["predictor_only"]
        lines.append(f"{'predictor only':<18}{q['ppl']:>9.3f}{q['ratio']:>9.3f}{p['predicted_share']:>9.1%}")
    for f in r["flash"]:
        if "error" in f:
            lines.append(f"{'flash ' + str(f['memory']):<18}does not fit: {f['error']}")
            continue
        lines.append(f"{'flash ' + str(f['memory']):<18}{f['ppl']:>9.3f}{f['ratio']:>9.3f}{f['wanted_share']:>9.1%}"
                     f"{f['read_share']:>10.1%}{f['useful_share']:>12.1%}{f['cached_share']:>8.1%}"
                     f"{f['hit_rate']:>7.2f}{f['ms_per_token']:>8.1f}")
        if f.get("hot_share"):
            lines.append(f"{'':<18}hot: {f['hot_share']:.1%} of the FFN pinned (in wanted and cached)")
        if "ahead_read_share" in f:
            lines.append(f"{'':<18}lookahead ({r['lookahead']}): {f['ahead_read_share']:.1%} of the FFN read early per token, "
                         f"{f['late_read_share']:.1%} read at the layer (missed by the guess); guess recall "
                         f"{f['guess_recall']:.3f}, precision {f['guess_precision']:.3f}")
    lines.append("wanted: neurons the source names per token (plus the pinned hot ones); bytes/tok: FFN bytes "
                 "read from disk per token (bridged gaps included); neurons/tok: the neurons read per token (their "
                 "bundles, the missing ones: JSON useful_share); cached: the caches "
                 "(plus hot); shares of the whole FFN")
    if r.get("layers"):
        lines += ["", f"{'layer':>5}{'recall':>9}{'precision':>11}{'predicted':>11}{'labelled':>10}"]
        for L in r["layers"]:
            lines.append(f"{L['layer']:>5}{L['recall']:>9.3f}{L['precision']:>11.3f}{L['predicted_share']:>11.1%}"
                         f"{L['label_share']:>10.1%}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    p = Parser(prog="llmflash eval", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", default=None, help="store folder (default: the embedded SmolLM2)")
    p.add_argument("--text", metavar="FILE",
                   help="evaluation text (default: documentation text disjoint from calibrate's default)")
    p.add_argument("--tokens", type=int, default=512, help="tokens evaluated (default %(default)s)")
    p.add_argument("--memory", action="append",
                   help="flash memory budget(s), repeatable, e.g. 0.75x, 50%%, 150MB (default 0.75x and 0.5x)")
    p.add_argument("--window", type=int, default=4, help="flash window K (default %(default)s)")
    p.add_argument("--sparsity", default="predictor",
                   help="wanted-set source: predictor[:RECALL[/STAY]], oracle[:KEEP] or all (default "
                        "predictor); STAY, a higher recall: cached neurons stay wanted at its lower threshold")
    p.add_argument("--threads", type=int, default=2, help="torch threads, at most 8 per core (default %(default)s)")
    p.add_argument("--lookahead", choices=["layer", "attention"],
                   help="flash guesses a layer's set early and starts its reads: from the layer before's "
                        "FFN input (layer) or from the layer's attention input (attention); checked at the "
                        "layer; reports the shares read early and late")
    p.add_argument("--hot", type=float, default=0.0, metavar="SHARE",
                   help="pin that share of each layer's neurons, the most often active in calibration, "
                        "resident and always computed (the predictors then cover the rest; default 0)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(list(argv))
    check_threads(a.threads)                 # before the default model is converted
    path = store_or_default(a.store)
    r = evaluate(path, None, a.tokens, a.memory or ["0.75x", "0.5x"], a.window, a.sparsity, a.threads,
                 progress=not (a.quiet or a.json), lookahead=a.lookahead, hot=a.hot, text_file=a.text)
    print(json.dumps(r, indent=1) if a.json else format_report(r))
    return 0
