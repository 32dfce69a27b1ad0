"""`llmflash place`: reorder a store's neurons so that co-activated ones sit side by side.

    llmflash place STORE [--text FILE ...] [--tokens N] [--sparsity S] [--hot SHARE]
                         [--partners K] [--decay D] [--threads T] [--quiet]

The arguments, the text and the one-line report; statistics, ordering and the atomic rewrite are
llmflash.placement. Default text: the calibration text (`llmflash calibrate`'s default), never
the held-out text `llmflash eval` reads. Place after calibrating, with the sparsity and hot share
you run with: the order follows the wanted sets that source names.
"""

from __future__ import annotations

import sys
from typing import Sequence

from ..defaults import store_or_default
from ..errors import LlmflashError
from .args import Parser
from .texts import default_text, read_texts, token_ids

HELP = "reorder a store's neurons by co-activation, so that each token's reads are few and large"
DESCRIPTION = (
    "`llmflash place`: store each layer's co-activated neurons side by side (llmflash.placement). "
    "The model's outputs do not change; only where each neuron lies in ffn.bin."
)


def build_parser() -> Parser:
    from ..placement.settings import DECAY, PARTNERS, PLACE_TOKENS

    p = Parser(prog="llmflash place", description=DESCRIPTION)
    p.add_argument("store", nargs="?", default=None, help="store folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument(
        "--text", action="append", metavar="FILE", help="text file(s), repeatable (default: the calibration text)"
    )
    p.add_argument("--tokens", type=int, default=PLACE_TOKENS, help="tokens of text (default %(default)s)")
    p.add_argument(
        "--sparsity",
        default=None,
        help="the wanted sets to follow, as generate's --sparsity (default: predictor once calibrated, else oracle)",
    )
    p.add_argument(
        "--hot",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="the share of each layer pinned at run time (generate's --hot): placed together at the end",
    )
    p.add_argument("--partners", type=int, default=PARTNERS, help="affinities kept per neuron (default %(default)s)")
    p.add_argument(
        "--decay",
        type=float,
        default=DECAY,
        help="per step, the weight of a placed neuron in choosing the next (default %(default)s)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads, at most 8 per core (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str]) -> int:
    from ..placement import place_store
    from ..store import Store
    from ..threads import check_threads, set_threads

    a = build_parser().parse_args(list(argv))
    set_threads(check_threads(a.threads))
    if a.tokens < 1:
        raise LlmflashError(f"--tokens must be at least 1, got {a.tokens}")
    path = store_or_default(a.store)
    texts = read_texts(a.text) or [default_text()]
    ids = token_ids(Store(path), texts)[: a.tokens]
    r = place_store(path, ids, sparsity=a.sparsity, hot=a.hot, partners=a.partners, decay=a.decay, progress=not a.quiet)
    runs = r["runs_per_token"]
    print(
        f"placed {path}: {r['tokens']} tokens, sparsity {r['sparsity']}, hot {r['hot']}; runs of wanted "
        f"neurons per token and layer {runs['before']:.1f} -> {runs['after']:.1f}; {r['seconds']['total']:.0f} s",
        file=sys.stderr,
    )
    return 0
