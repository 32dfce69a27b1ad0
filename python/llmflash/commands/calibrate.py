"""`llmflash calibrate`: train the sparsity predictors of a store.

    llmflash calibrate STORE [--text FILE ...] [--tokens N] [--kind lowrank|shadow] [--rank R]
                             [--sparsity S] [--recall T] [--epochs E] [--seed S]

The arguments, the calibration text and the report; recording, training and saving are
llmflash.sparsity.calibration. Default text: the first CALIBRATION_CHARS characters of CPython's
documentation topics (llmflash.commands.texts); `llmflash eval` defaults to the text after them.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ..defaults import store_or_default
from ..errors import InvalidArgumentError, LlmflashError
from .args import Parser
from .texts import CALIBRATION_CHARS, default_text, read_texts, token_ids

HELP = "train the per-layer sparsity predictors of a store"
DESCRIPTION = "`llmflash calibrate`: train the sparsity predictors of a store (llmflash.sparsity)."
DEFAULTS = dict(
    tokens=16384, rank=128, sparsity=0.5, recall=0.99, epochs=2, seed=0, chunk=512, heldout=0.125, batch=512, lr=3e-3
)


def calibrate(
    store_path: str | os.PathLike[str],
    texts: list[str] | None = None,
    tokens: int = DEFAULTS["tokens"],
    rank: int = DEFAULTS["rank"],
    sparsity: float = DEFAULTS["sparsity"],
    recall: float = DEFAULTS["recall"],
    epochs: int = DEFAULTS["epochs"],
    seed: int = DEFAULTS["seed"],
    chunk: int = DEFAULTS["chunk"],
    heldout: float = DEFAULTS["heldout"],
    batch: int = DEFAULTS["batch"],
    lr: float = DEFAULTS["lr"],
    threads: int | None = 2,
    progress: bool = True,
    kind: str = "lowrank",
) -> dict[str, Any]:
    """Calibrate the store's predictors; returns the manifest entry written (with timings).
    kind "lowrank" trains the paper's d -> R -> n predictors; "shadow" quantizes the FFN's own
    gate/up rows to 4 bits (llmflash.sparsity.shadow: nothing to train, thresholds as for lowrank)."""
    import torch

    from ..sparsity.calibration import calibrate_store
    from ..store import Store
    from ..strategies.dense import DenseFFN
    from ..threads import check_threads, set_threads

    _check(kind, sparsity, recall, heldout, lr, tokens, rank, epochs, chunk, batch)
    set_threads(check_threads(threads))
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    store = Store(store_path)
    if store.config.n_experts:
        raise InvalidArgumentError(
            "a mixture-of-experts store needs no predictors: its router names the experts", store.path
        )
    ids = token_ids(store, texts if texts is not None else [default_text()])[:tokens]
    if len(ids) < 2:
        raise LlmflashError(f"calibration text gave {len(ids)} tokens; need at least 2")
    with torch.inference_mode():
        dense = DenseFFN(store, dequantize=True)  # float weights: a quantized store's dequantized
    return calibrate_store(
        store,
        dense,
        ids,
        kind,
        rank,
        sparsity,
        recall,
        epochs,
        seed,
        chunk,
        heldout,
        batch,
        lr,
        progress=progress,
        started=t0,
    )


def _check(
    kind: str,
    sparsity: float,
    recall: float,
    heldout: float,
    lr: float,
    tokens: int,
    rank: int,
    epochs: int,
    chunk: int,
    batch: int,
) -> None:
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
        raise InvalidArgumentError(
            "tokens >= 2, rank >= 1, epochs >= 0, chunk >= 1 and batch >= 1 are required, got "
            f"tokens {tokens}, rank {rank}, epochs {epochs}, chunk {chunk}, batch {batch}"
        )


def build_parser() -> Parser:
    p = Parser(prog="llmflash calibrate", description=DESCRIPTION)
    p.add_argument("store", nargs="?", default=None, help="store folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--text",
        action="append",
        metavar="FILE",
        help="calibration text file(s), repeatable (default: CPython's documentation topics, "
        f"its first {CALIBRATION_CHARS} characters)",
    )
    p.add_argument("--tokens", type=int, default=DEFAULTS["tokens"], help="calibration tokens (default %(default)s)")
    p.add_argument(
        "--kind",
        choices=("lowrank", "shadow"),
        default="lowrank",
        help="lowrank: the paper's trained d -> R -> n predictors (default); shadow: the FFN's gate/up "
        "rows at 4 bits, far closer to the oracle on small SwiGLU models at 1/6 of the FFN's size",
    )
    p.add_argument("--rank", type=int, default=DEFAULTS["rank"], help="predictor rank R (default %(default)s)")
    p.add_argument(
        "--sparsity",
        type=float,
        default=DEFAULTS["sparsity"],
        help="SwiGLU/GELU labels: share of (token, neuron) pairs labelled inactive by the per-layer "
        "|act| threshold; ReLU models ignore it (act > 0). Default %(default)s",
    )
    p.add_argument(
        "--recall",
        type=float,
        default=DEFAULTS["recall"],
        help="target recall of the per-layer thresholds on held-out tokens (default %(default)s: "
        "SmolLM2 needs about 0.99 to stay within 3%% of dense perplexity)",
    )
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="training passes (default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--chunk", type=int, default=DEFAULTS["chunk"], help="tokens per dense pass (default %(default)s)")
    p.add_argument(
        "--heldout",
        type=float,
        default=DEFAULTS["heldout"],
        help="share of tokens held out to choose thresholds (default %(default)s)",
    )
    p.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="mini-batch tokens (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, at most 8 per core (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str]) -> int:
    from ..store import PREDICTORS
    from ..threads import check_threads

    a = build_parser().parse_args(list(argv))
    check_threads(a.threads)  # before the default model is converted
    path = store_or_default(a.store)
    texts = read_texts(a.text)
    entry = calibrate(
        path,
        texts,
        tokens=a.tokens,
        rank=a.rank,
        sparsity=a.sparsity,
        recall=a.recall,
        epochs=a.epochs,
        seed=a.seed,
        chunk=a.chunk,
        heldout=a.heldout,
        batch=a.batch,
        threads=a.threads,
        progress=not a.quiet,
        kind=a.kind,
    )
    e = entry["expected"]
    what = "4-bit shadow" if a.kind == "shadow" else f"rank {entry['rank']}"
    if a.kind != "shadow" and entry["rank"] != a.rank:
        what += f" (--rank {a.rank} capped at the model's width)"
    print(
        f"wrote {Path(path) / PREDICTORS}: {entry['tokens']} tokens, {what}, "
        f"held-out recall {e['recall']:.3f}, precision {e['precision']:.3f}, "
        f"predicted share {e['predicted_share']:.3f}; {entry['seconds']['total']:.0f} s",
        file=sys.stderr,
    )
    return 0
