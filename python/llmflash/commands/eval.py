"""`llmflash eval`: what the sparsity predictors cost in quality and save in I/O.

    llmflash eval STORE [--text FILE] [--tokens N] [--memory M ...] [--window K]
                        [--sparsity predictor[:RECALL[/STAY]]] [--hot SHARE]
                        [--lookahead layer|attention] [--json]

The arguments and the tables (or JSON with --json); what is measured: llmflash.commands.evaluation.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from ..defaults import store_or_default
from .args import Parser

HELP = "perplexity of dense vs flash, predictor recall/precision, FFN share read per token"


def format_report(r: dict[str, Any]) -> str:
    """The report as tables: the run, the predictors, one row per strategy, and per layer."""
    lines = [
        f"{r['store']}: {r['tokens']} tokens, window {r['window']}, sparsity {r['sparsity']}"
        + (f", --hot {r['hot']}" if r.get("hot") else "")
    ]
    p = r.get("predictor")
    if p:
        lines.append(_predictor_line(p))
    lines.append("")
    lines.append(
        f"{'':<18}{'ppl':>9}{'x dense':>9}{'wanted':>9}{'bytes/tok':>10}{'neurons/tok':>12}{'cached':>8}"
        f"{'hits':>7}{'ms/tok':>8}"
    )
    d = r["dense"]["ppl"]
    lines.append(f"{'dense':<18}{d:>9.3f}{1.0:>9.3f}{'100%':>9}")
    if "predictor_only" in r:
        q = r["predictor_only"]
        lines.append(f"{'predictor only':<18}{q['ppl']:>9.3f}{q['ratio']:>9.3f}{p['predicted_share']:>9.1%}")
    for f in r["flash"]:
        lines += _flash_lines(f, r.get("lookahead"))
    lines.append(
        "wanted: neurons the source names per token (plus the pinned hot ones); bytes/tok: FFN bytes "
        "read from disk per token (bridged gaps included); neurons/tok: the neurons read per token (their "
        "bundles, the missing ones: JSON useful_share); cached: the caches "
        "(plus hot); shares of the whole FFN"
    )
    if r.get("layers"):
        lines += ["", f"{'layer':>5}{'recall':>9}{'precision':>11}{'predicted':>11}{'labelled':>10}"]
        for L in r["layers"]:
            lines.append(
                f"{L['layer']:>5}{L['recall']:>9.3f}{L['precision']:>11.3f}{L['predicted_share']:>11.1%}"
                f"{L['label_share']:>10.1%}"
            )
    return "\n".join(lines)


def _predictor_line(p: dict[str, Any]) -> str:
    kind = "4-bit shadow" if p.get("kind") == "shadow" else f"rank {p['rank']}"
    return (
        f"predictors: {kind}, keep {p['keep']}, {p['tokens']} calibration tokens, "
        f"recall target {p['recall_target']}"
        + (f" (cached neurons stay at {p['stay']})" if p.get("stay") is not None else "")
        + f", {p['bytes'] / 1e6:.1f} MB; measured recall "
        f"{p['recall']:.3f}, precision {p['precision']:.3f}, predicted {p['predicted_share']:.1%} "
        "of (token, neuron) pairs"
    )


def _flash_lines(f: dict[str, Any], lookahead: str | None) -> list[str]:
    name = f"{'flash ' + str(f['memory']):<18}"
    if "error" in f:
        return [f"{name}does not fit: {f['error']}"]
    lines = [
        f"{name}{f['ppl']:>9.3f}{f['ratio']:>9.3f}{f['wanted_share']:>9.1%}"
        f"{f['read_share']:>10.1%}{f['useful_share']:>12.1%}{f['cached_share']:>8.1%}"
        f"{f['hit_rate']:>7.2f}{f['ms_per_token']:>8.1f}"
    ]
    if f.get("hot_share"):
        lines.append(f"{'':<18}hot: {f['hot_share']:.1%} of the FFN pinned (in wanted and cached)")
    if f.get("requests_per_token"):
        lines.append(
            f"{'':<18}reads: {f['requests_per_token']:.0f} requests per token, {f['kb_per_request']:.1f} KB each; "
            f"bytes read {f['read_share'] / max(f['useful_share'], 1e-12):.2f}x the neurons' bundles"
        )
    if "ahead_read_share" in f:
        lines.append(
            f"{'':<18}lookahead ({lookahead}): {f['ahead_read_share']:.1%} of the FFN read early "
            f"per token, {f['late_read_share']:.1%} read at the layer (missed by the guess); guess recall "
            f"{f['guess_recall']:.3f}, precision {f['guess_precision']:.3f}"
        )
    return lines


def main(argv: Sequence[str]) -> int:
    from ..threads import check_threads
    from .evaluation import evaluate

    p = Parser(prog="llmflash eval", description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", default=None, help="store folder (default: the embedded SmolLM2)")
    p.add_argument(
        "--text", metavar="FILE", help="evaluation text (default: documentation text disjoint from calibrate's default)"
    )
    p.add_argument("--tokens", type=int, default=512, help="tokens evaluated (default %(default)s)")
    p.add_argument(
        "--memory",
        action="append",
        help="flash memory budget(s), repeatable, e.g. 0.75x, 50%%, 150MB (default 0.75x and 0.5x)",
    )
    p.add_argument("--window", type=int, default=4, help="flash window K (default %(default)s)")
    p.add_argument(
        "--sparsity",
        default="predictor",
        help="wanted-set source: predictor[:RECALL[/STAY]], oracle[:KEEP] or all (default "
        "predictor); STAY, a higher recall: cached neurons stay wanted at its lower threshold",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads, at most 8 per core (default %(default)s)")
    p.add_argument(
        "--lookahead",
        choices=["layer", "attention"],
        help="flash guesses a layer's set early and starts its reads: from the layer before's "
        "FFN input (layer) or from the layer's attention input (attention); checked at the "
        "layer; reports the shares read early and late",
    )
    p.add_argument(
        "--hot",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="pin that share of each layer's neurons, the most often active in calibration, "
        "resident and always computed (the predictors then cover the rest; default 0)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where flash runs: cpu (default), cuda, cuda:N or auto (the dense reference runs on the CPU)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(list(argv))
    check_threads(a.threads)  # before the default model is converted
    path = store_or_default(a.store)
    r = evaluate(
        path,
        None,
        a.tokens,
        a.memory or ["0.75x", "0.5x"],
        a.window,
        a.sparsity,
        a.threads,
        progress=not (a.quiet or a.json),
        lookahead=a.lookahead,
        hot=a.hot,
        text_file=a.text,
        device=a.device,
    )
    print(json.dumps(r, indent=1) if a.json else format_report(r))
    return 0
