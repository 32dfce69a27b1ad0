"""A tiny GGUF file as llama.cpp writes one (reversed shapes, the Q/K row permutation, a quant type
per tensor, a byte-level BPE vocabulary), written with gguf.GGUFWriter, and the HF-layout weights
it encodes: the source the GGUF converter's tests start from."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType


DIM, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2


HD = DIM // HEADS


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    from llmflash.convert.gguf_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [3, 3, 3]
    alphabet = list(bytes_to_unicode().values())
    tokens += alphabet
    types += [1] * len(alphabet)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n"]
    for m in merges:
        tokens.append(m.replace(" ", ""))
        types.append(1)
    return tokens, types, merges


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF -> GGUF), the forward direction."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_weights(vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    r = lambda *s: g.standard_normal(s).astype(np.float32) * 0.1  # noqa: E731
    w = {"embed": r(vocab, DIM), "norm": 1 + r(DIM)}
    for i in range(LAYERS):
        w |= {
            f"{i}.q": r(HEADS * HD, DIM),
            f"{i}.k": r(KV_HEADS * HD, DIM),
            f"{i}.v": r(KV_HEADS * HD, DIM),
            f"{i}.o": r(DIM, HEADS * HD),
            f"{i}.gate": r(FFN, DIM),
            f"{i}.up": r(FFN, DIM),
            f"{i}.down": r(DIM, FFN),
            f"{i}.attn_norm": 1 + r(DIM),
            f"{i}.ffn_norm": 1 + r(DIM),
        }
    return w


# quant type per tensor: exercises F32, F16 and five block formats in one file
TYPES = {
    "embed": Q.Q8_0,
    "q": Q.Q4_1,
    "k": Q.F16,
    "v": Q.F32,
    "o": Q.Q5_0,
    "gate": Q.Q8_0,
    "up": Q.Q4_0,
    "down": Q.Q5_1,
}


def roundtrip(w: np.ndarray, qtype) -> np.ndarray:
    """What a tensor of this type decodes to (the reference the converter must reproduce)."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    drop: str | None = None,
    reshape: str | None = None,
    override: dict | None = None,
    seed: int = 0,
    tokenizer: str = "gpt2",
    extra: dict | None = None,
    kv: dict | None = None,
) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF as llama.cpp would write it; returns the HF-layout weights it encodes."""
    tokens, types, merges = byte_level_vocab()
    w = hf_weights(len(tokens), seed)
    out = gguf.GGUFWriter(path, arch)
    a = arch
    out.add_uint32(f"{a}.block_count", LAYERS)
    out.add_uint32(f"{a}.context_length", 256)
    out.add_uint32(f"{a}.embedding_length", DIM)
    out.add_uint32(f"{a}.feed_forward_length", FFN)
    out.add_uint32(f"{a}.attention.head_count", HEADS)
    out.add_uint32(f"{a}.attention.head_count_kv", KV_HEADS)
    out.add_float32(f"{a}.rope.freq_base", 10000.0)
    out.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    out.add_uint32(f"{a}.rope.dimension_count", HD)
    out.add_string("general.name", "tiny")
    for key, value in (kv or {}).items():
        out.add_string(key, value) if isinstance(value, str) else out.add_float32(key, value)
    if tokenizer == "gpt2":
        out.add_string("tokenizer.ggml.model", "gpt2")
        out.add_string("tokenizer.ggml.pre", "smollm")
        out.add_array("tokenizer.ggml.tokens", tokens)
        out.add_array("tokenizer.ggml.token_type", types)
        out.add_array("tokenizer.ggml.merges", merges)
        out.add_uint32("tokenizer.ggml.bos_token_id", 1)
        out.add_uint32("tokenizer.ggml.eos_token_id", 2)
        out.add_bool("tokenizer.ggml.add_bos_token", False)
        out.add_string("tokenizer.chat_template", "{{ messages }}")

    def put(name: str, arr: np.ndarray, qtype) -> None:
        if override and name in override:
            arr, qtype = override[name]
        if name == drop:
            return
        if name == reshape:
            arr = arr[:-1]  # one row short: a shape the metadata does not allow
        if qtype == Q.F32 or qtype is None:
            out.add_tensor(name, np.ascontiguousarray(arr))
        elif qtype == Q.F16:
            out.add_tensor(name, arr.astype(np.float16))
        else:
            out.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)

    put("token_embd.weight", w["embed"], TYPES["embed"])
    put("output_norm.weight", w["norm"], Q.F32)
    for i in range(LAYERS):
        b = f"blk.{i}."
        put(b + "attn_q.weight", llama_cpp_permute(w[f"{i}.q"], HEADS), TYPES["q"])
        put(b + "attn_k.weight", llama_cpp_permute(w[f"{i}.k"], KV_HEADS), TYPES["k"])
        put(b + "attn_v.weight", w[f"{i}.v"], TYPES["v"])
        put(b + "attn_output.weight", w[f"{i}.o"], TYPES["o"])
        put(b + "ffn_gate.weight", w[f"{i}.gate"], TYPES["gate"])
        put(b + "ffn_up.weight", w[f"{i}.up"], TYPES["up"])
        put(b + "ffn_down.weight", w[f"{i}.down"], TYPES["down"])
        put(b + "attn_norm.weight", w[f"{i}.attn_norm"], Q.F32)
        put(b + "ffn_norm.weight", w[f"{i}.ffn_norm"], Q.F32)
    for name, arr in (extra or {}).items():
        put(name, arr, Q.F32)
    out.write_header_to_file()
    out.write_kv_data_to_file()
    out.write_tensors_to_file()
    out.close()
    return w


# -- the rounding a quantized store applies, done by gguf.quants (the tests' independent reference)
KINDS = ("q8_0", "q4_0", "q4_1")
GGML = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
GGML["q4_1"] = gguf.GGMLQuantizationType.Q4_1


def rt(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w (rows, cols) rounded as the store rounds it: quantized along rows, dequantized (gguf)."""
    q = gguf.quants.quantize(np.ascontiguousarray(w.detach().float().numpy()), GGML[kind])
    return torch.from_numpy(gguf.quants.dequantize(q, GGML[kind]).reshape(w.shape).astype(np.float32))


def rt_padded(w: torch.Tensor, kind: str) -> torch.Tensor:
    """rt of w (rows, cols) with its columns padded with zeros to a multiple of 32 (as a quantized
    store pads a layer's neurons in down_proj's blocks), cropped back."""
    cols = -(-w.shape[1] // 32) * 32
    padded = torch.zeros(w.shape[0], cols)
    padded[:, : w.shape[1]] = w.detach().float()
    return rt(padded, kind)[:, : w.shape[1]]
