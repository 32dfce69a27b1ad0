"""Quantized stores of the embedded SmolLM2 against its float16 store: size, perplexity on the
held-out text (and transformers on the GGUF itself, the reference for the store that keeps its
blocks) and `dense` decode tokens/s, the stores interleaved round by round in one process.

    python benches/bench_quantized.py [--tokens 1024] [--threads 1 2] [--out bench-out/quantized]
        [--llama-bench PATH]   # llama.cpp on the same GGUF in the same rounds (benches/llama_bench.py)

Converts the GGUF into OUT/{q8_0,q4_0,q4_1}.llmflash once (the float16 store is the cached
default model). Not part of CI: run it with nothing else on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from pathlib import Path

import llama_bench
import torch

from llmflash.api import FlashModel
from llmflash.commands.evaluation import _perplexity, _token_ids
from llmflash.convert.gguf import convert_gguf
from llmflash.defaults import default_gguf_path, ensure_default_store
from llmflash.strategies.dense import load_dense

KINDS = ("q8_0", "q4_1", "q4_0")
NEW_TOKENS = 64
PROMPT = 64  # prompt tokens for the prefill figure
ROUNDS = 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="held-out tokens for perplexity")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="bench-out/quantized")
    ap.add_argument("--llama-bench", type=Path, help="a llama-bench binary (benches/llama_bench.py builds one)")
    ap.add_argument("--llama-bench-pp", type=Path, help="another for the prompt pass where the first's dies")
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
    llama = None if a.llama_bench is None else (a.llama_bench, a.llama_bench_pp or a.llama_bench)
    speed = {t: _speeds(stores, t, llama, gguf) for t in a.threads}
    print(f"GGUF {gguf.name}: {gguf.stat().st_size / 1e6:.1f} MB; transformers on it: perplexity {ref:.3f}")
    print("| store | size MB | x GGUF | perplexity | x float16 |")
    for k in stores:
        print(
            f"| {k} | {size[k] / 1e6:.1f} | {size[k] / gguf.stat().st_size:.3f} | {ppl[k]:.3f} | "
            f"{ppl[k] / ppl['float16']:.4f} |"
        )
    ref_name = "llama.cpp" if a.llama_bench else "float16"
    head = " | ".join(f"{f} {t} thr | x {ref_name}" for t in a.threads for f in ("decode", "prefill"))
    print(f"\ntokens/s, {PROMPT}-token prompt, {NEW_TOKENS} new tokens (median of {ROUNDS} interleaved rounds)")
    print(f"| run | {head} |")
    for k in speed[a.threads[0]]:
        cols = " | ".join(
            f"{speed[t][k][f]:.1f} | {speed[t][k][f] / speed[t][ref_name][f]:.2f}"
            for t in a.threads
            for f in ("tg", "pp")
        )
        print(f"| {k} | {cols} |")


def _transformers_ppl(gguf: Path, ids: torch.Tensor) -> float:
    import transformers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        return _perplexity(hf(ids[None]).logits[0], ids)


def _speeds(
    stores: dict[str, Path], threads: int, llama: tuple[Path, Path] | None, gguf: Path
) -> dict[str, dict[str, float]]:
    """Median prefill and decode tokens/s ({"pp": .., "tg": ..}) of greedy `dense` generation per
    store (PROMPT prompt tokens, NEW_TOKENS new ones; the model's own prefill/decode counters, so
    tokenizing and sampling are left out, as llama-bench leaves them out), and llama-bench's on
    the GGUF when given (`llama`: the binaries for decode and for prefill), all interleaved round
    by round."""
    torch.set_num_threads(threads)
    models = {k: FlashModel.open(p, strategy="dense") for k, p in stores.items()}
    prompt = list(range(100, 100 + PROMPT))
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in [*stores, *(["llama.cpp"] if llama else [])]}
    for r in range(ROUNDS + 1):
        for k, m in models.items():
            before = m.stats()
            m.generate(prompt, NEW_TOKENS, stop_at_eos=False)
            after = m.stats()
            d = {f: after[f] - before[f] for f in ("tokens_in", "prefill_s", "tokens_out", "decode_s")}
            if r:  # the first round warms up
                runs[k].append({"pp": d["tokens_in"] / d["prefill_s"], "tg": d["tokens_out"] / d["decode_s"]})
        if llama is not None and r:
            tg = llama_bench.run(llama[0], gguf, threads, PROMPT, NEW_TOKENS, passes=("tg",))["tg"]
            pp = llama_bench.run(llama[1], gguf, threads, PROMPT, NEW_TOKENS, passes=("pp",))["pp"]
            runs["llama.cpp"].append({"pp": pp, "tg": tg})
    return {k: {f: statistics.median(v[f] for v in rs) for f in ("pp", "tg")} for k, rs in runs.items()}


if __name__ == "__main__":
    main()
