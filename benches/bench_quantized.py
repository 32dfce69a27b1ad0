"""Quantized stores of the embedded SmolLM2 against its float16 store: size, perplexity on the
held-out text (and transformers on the GGUF itself, the reference for the store that keeps its
blocks) and `dense` decode tokens/s, the stores interleaved round by round in one process.

    python benches/bench_quantized.py [--tokens 1024] [--threads 1 2] [--out bench-out/quantized]

Converts the GGUF into OUT/{q8_0,q4_0,q4_1}.llmflash once (the float16 store is the cached
default model). Not part of CI: run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from llmflash.api import FlashModel
from llmflash.commands.evaluation import _perplexity, _token_ids
from llmflash.convert.gguf import convert_gguf
from llmflash.defaults import default_gguf_path, ensure_default_store
from llmflash.strategies.dense import load_dense

KINDS = ("q8_0", "q4_1", "q4_0")
NEW_TOKENS = 64
ROUNDS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens for perplexity")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench-out/quantized")
    a = ap.parse_args()
    gguf = default_gguf_path()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stores = {"float16": ensure_default_store()}
    for k in KINDS:
        p = out / f"{k}.llmflash"
        if not p.is_dir():
            convert_gguf(gguf, p, dtype=k)
        stores[k] = p
    size = {k: sum(f.stat().st_size for f in p.iterdir()) for k, p in stores.items()}
    ppl, ids = {}, None
    for k, p in stores.items():
        model, store = load_dense(p)
        ids = _token_ids(store, None, None, a.tokens) if ids is None else ids
        ppl[k] = _perplexity(model.forward(ids, model.new_cache(len(ids))), ids)
    ref = _transformers_ppl(gguf, ids)
    speed = {t: _decode_speed(stores, t) for t in a.threads}
    print(f"GGUF {gguf.name}: {gguf.stat().st_size / 1e6:.1f} MB; transformers on it: perplexity {ref:.3f}")
    head = " | ".join(f"decode tok/s {t} thr" for t in a.threads)
    print(f"| store | size MB | x GGUF | perplexity | x float16 | {head} |")
    for k in stores:
        cols = " | ".join(f"{speed[t][k]:.1f}" for t in a.threads)
        print(
            f"| {k} | {size[k] / 1e6:.1f} | {size[k] / gguf.stat().st_size:.3f} | {ppl[k]:.3f} | "
            f"{ppl[k] / ppl['float16']:.4f} | {cols} |"
        )


def _transformers_ppl(gguf: Path, ids: torch.Tensor) -> float:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        return _perplexity(hf(ids[None]).logits[0], ids)


def _decode_speed(stores: dict[str, Path], threads: int) -> dict[str, float]:
    """Median tokens/s of greedy `dense` decode, stores interleaved round by round."""
    torch.set_num_threads(threads)
    models = {k: FlashModel.open(p, strategy="dense") for k, p in stores.items()}
    times: dict[str, list[float]] = {k: [] for k in stores}
    for r in range(ROUNDS + 1):
        for k, m in models.items():
            t0 = time.perf_counter()
            m.generate("The capital of France is", NEW_TOKENS, stop_at_eos=False)
            if r:  # the first round warms up
                times[k].append(time.perf_counter() - t0)
    return {k: NEW_TOKENS / statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    main()
