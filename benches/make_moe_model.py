"""Write an OLMoE-1B-7B-shaped Hugging Face checkpoint with random weights (~13.8 GB float16)
and convert it to an llmflash store: the two forms of the same weights that bench_moe.py runs.
Or (--shape mixtral-q4_0) a Mixtral-8x7B-shaped q4_0 store alone (~26 GB; no float twin fits).

    python benches/make_moe_model.py [--out /work/bench-data/olmoe-random]
        -> OUT/hf (config.json + one safetensors file per layer) and OUT/store.llmflash
    python benches/make_moe_model.py --shape mixtral-q4_0 [--out /work/bench-data/mixtral-q4_0]
        -> OUT/store.llmflash

Mixtral-8x7B's shape: 32 layers, d = 4,096, 32 query heads and 8 KV heads of 128, 8 experts of
14,336 neurons, top-2 (renormalised), vocab 32,000, untied LM head; every matrix in q4_0 blocks
of random nibbles under float16 scales of 2^-9..2^-8 (random signs), norm weights 1, written
through StoreWriter as blocks kept as they are (a GGUF's own would be).

allenai/OLMoE-1B-7B-0924's shape: 16 layers, d = 2,048, 16 heads of 128 (no GQA), q/k RMSNorm
over the whole projections, 64 experts of 1,024 SwiGLU neurons per layer, top-8 without
renormalisation, vocab 50,304, untied LM head. The HF files use the per-expert tensor names the
Hub's OLMoE checkpoints use (mlp.experts.E.gate_proj ...), so transformers loads them as it loads
the real model and llmflash converts them with its own converter. Values are random float16 of
magnitude 2^-7..2^-6 with random signs, norm weights 1 (make_opt_store.random_f16_bits: the
file is written at disk speed). With such weights the router's softmax is nearly uniform: the
experts it picks are close to random, the worst case for any expert cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from make_opt_store import random_f16_bits  # noqa: E402

DEFAULT_OUT = Path("/work/bench-data/olmoe-random")
D, L, H, E, F, K, V = 2048, 16, 16, 64, 1024, 8, 50304


def hf_config() -> dict:
    return {
        "architectures": ["OlmoeForCausalLM"],
        "model_type": "olmoe",
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": H,
        "num_key_value_heads": H,
        "num_experts": E,
        "num_experts_per_tok": K,
        "norm_topk_prob": False,
        "vocab_size": V,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "clip_qkv": None,
        "attention_bias": False,
        "bos_token_id": None,
        "eos_token_id": 50279,
        "pad_token_id": 1,
        "torch_dtype": "float16",
    }


def layer_tensors(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    out = [(p + "input_layernorm.weight", (D,)), (p + "post_attention_layernorm.weight", (D,))]
    out += [(p + f"self_attn.{x}_proj.weight", (D, D)) for x in ("q", "k", "v", "o")]
    out += [(p + "self_attn.q_norm.weight", (D,)), (p + "self_attn.k_norm.weight", (D,))]
    out += [(p + "mlp.gate.weight", (E, D))]
    for e in range(E):
        x = f"{p}mlp.experts.{e}."
        out += [(x + "gate_proj.weight", (F, D)), (x + "up_proj.weight", (F, D)), (x + "down_proj.weight", (D, F))]
    return out


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> int:
    """One F16 safetensors file of `tensors`: norm weights 1, the rest random (streamed)."""
    header, off = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for name, shape in tensors:
            n = int(np.prod(shape))
            if name.endswith("norm.weight"):
                f.write(np.full(n, 0x3C00, dtype=np.uint16).tobytes())
                continue
            for start in range(0, n, 64 << 20):
                f.write(random_f16_bits(min(64 << 20, n - start), rng).tobytes())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return off


def make_hf(out: Path, seed: int = 0) -> Path:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    files = [("model-globals.safetensors", [("model.embed_tokens.weight", (V, D)), ("lm_head.weight", (V, D))])]
    files[0][1].append(("model.norm.weight", (D,)))
    files += [(f"model-layer-{i:02d}.safetensors", layer_tensors(i)) for i in range(L)]
    index, total = {}, 0
    for name, tensors in tqdm(files, desc="write HF checkpoint"):
        if not (out / name).is_file():
            write_safetensors(out / name, tensors, rng)
        total += sum(int(np.prod(s)) * 2 for _, s in tensors)
        index.update({t: name for t, _ in tensors})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=1)
    )
    (out / "config.json").write_text(json.dumps(hf_config(), indent=1))
    return out


def random_q4_0(rows: int, cols: int, rng: np.random.Generator):
    """A random q4_0 QTensor (rows, cols): each 18-byte block a float16 scale then 16 bytes of
    nibbles."""
    import torch

    from llmflash.models.quant import QTensor, row_bytes

    blocks = rows * cols // 32
    data = rng.bit_generator.random_raw(-(-blocks * 18 // 8)).view(np.uint8)[: blocks * 18].reshape(blocks, 18)
    scale = random_f16_bits(blocks, rng) & 0x83FF | 0x1800  # exponent 6: |d| in [2^-9, 2^-8)
    data[:, :2] = scale.view(np.uint8).reshape(blocks, 2)
    return QTensor("q4_0", (rows, cols), torch.from_numpy(data.reshape(rows, row_bytes("q4_0", cols))))


def make_mixtral_q4_0(store: Path, seed: int = 0) -> Path:
    """A Mixtral-8x7B-shaped q4_0 store of random blocks (module docstring)."""
    import torch
    from tqdm import tqdm

    from llmflash.convert.writer import StoreWriter
    from llmflash.models.config import ModelConfig

    rng = np.random.default_rng(seed)
    Lm, Dm, Em, Fm, Vm = 32, 4096, 8, 14336, 32000
    cfg = ModelConfig(
        arch="llama", vocab_size=Vm, dim=Dm, n_layers=Lm, head_dim=128, n_heads=[32] * Lm, n_kv_heads=[8] * Lm,
        ffn_dims=[Em * Fm] * Lm, norm_eps=1e-5, max_positions=32768, rope_theta=1e6, tie_embeddings=False,
        n_experts=Em, experts_per_token=2, norm_topk_prob=True,
        name="Mixtral-8x7B shape, random q4_0 blocks (benches/make_moe_model.py)",
    )  # fmt: skip
    ones = torch.ones(Dm)
    with StoreWriter(store, cfg, dtype="q4_0", force=True) as w:
        resident = {"embed.weight": random_q4_0(Vm, Dm, rng), "lm_head.weight": random_q4_0(Vm, Dm, rng)}
        resident["norm.weight"] = ones.clone()
        for i in tqdm(range(Lm), desc="write Mixtral q4_0 layers"):
            p = f"layers.{i}."
            resident.update({p + "attn_norm.weight": ones.clone(), p + "ffn_norm.weight": ones.clone()})
            for x, r in (("q", 4096), ("k", 1024), ("v", 1024)):
                resident[p + f"attn.{x}.weight"] = random_q4_0(r, Dm, rng)
            resident[p + "attn.o.weight"] = random_q4_0(Dm, 4096, rng)
            router = torch.from_numpy(random_f16_bits(Em * Dm, rng).view(np.float16).astype(np.float32))
            resident[p + "ffn.router.weight"] = router.view(Em, Dm)
            n = Em * Fm
            w.write_layer(i, up=random_q4_0(n, Dm, rng), gate=random_q4_0(n, Dm, rng), down=random_q4_0(Dm, n, rng))
        w.write_resident(resident)
    return store


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write both again")
    ap.add_argument("--shape", choices=["olmoe", "mixtral-q4_0"], default="olmoe")
    a = ap.parse_args()
    if a.shape == "mixtral-q4_0":
        out = a.out if a.out != DEFAULT_OUT else DEFAULT_OUT.with_name("mixtral-q4_0")
        t0 = time.perf_counter()
        store = make_mixtral_q4_0(out / "store.llmflash", a.seed)
        size = sum(f.stat().st_size for f in store.iterdir() if f.is_file())
        print(f"store: {store} ({size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
        return 0
    if a.force and a.out.exists():
        shutil.rmtree(a.out)
    t0 = time.perf_counter()
    hf = make_hf(a.out / "hf", a.seed)
    print(f"HF checkpoint: {hf} ({time.perf_counter() - t0:.0f} s)")
    store = a.out / "store.llmflash"
    if not (store / "manifest.json").is_file():
        from llmflash.convert.hf import convert_hf

        convert_hf(hf, store, dtype="float16", force=True)
    size = sum(f.stat().st_size for f in store.iterdir() if f.is_file())
    print(f"store: {store} ({size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
