"""Hugging Face folder (config.json + *.safetensors) -> llmflash store.

    convert_hf(Path("SmolLM2-135M"), Path("smol.llmflash"), dtype="float16")

Architectures by config.json's `model_type`: `llama` (and `mistral` without a sliding window,
which is the same network), `opt`, `openelm`. Each has a small plan (convert/hf_archs.py): its
ModelConfig, every source tensor it needs with the expected shape, and how they map onto the
store's canonical names (llmflash.models.config). The whole plan is checked against the
safetensors headers before anything is written, so a missing tensor or a wrong shape fails in a
second, naming the tensor and the file (convert/hf_source.py reads the folder). Then tensors
are read layer by layer through safe_open (memory-mapped, one tensor at a time): each layer's
FFN goes to ffn.bin at once, so peak memory is the resident weights plus one layer, whatever the
model's size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConvertError, UnsupportedModelError
from .common import natural_key, parse_dtype, progress, regular_file
from .destination import check_destination
from .hf_archs import PLANS
from .hf_moe import MOE_PLANS
from .hf_source import CONFIG, Checkpoint, HFConfig, read_tokenizer
from .writer import StoreWriter

SUPPORTED = ("llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "opt", "openelm")
FP16_MAX = 65504.0


# -- the conversion ---------------------------------------------------------------------------------
def _cast(t: torch.Tensor, dtype: torch.dtype, name: str, path: Path) -> torch.Tensor:
    """To the store dtype, refusing values float16 cannot hold (they would become inf)."""
    if dtype == torch.float16 and t.dtype != torch.float16 and t.numel():
        big = t.abs().max().item()
        if big > FP16_MAX:
            raise ConvertError(
                f"tensor {name!r} holds {big:.3g}, beyond float16's range: convert with dtype bfloat16 or float32", path
            )
    return t.to(dtype)


def _check_unused(ck: Checkpoint, plan: Any, cfg_path: Path) -> None:
    """Every tensor in the checkpoint is one the plan reads or one it may ignore (plan.unused_ok):
    a tensor the config does not account for means the config does not describe these weights
    (fewer layers than the checkpoint holds, a variant with extra parts) and the store would be
    silently wrong. Names the first few, their files and config.json."""
    used = {ck.resolve(n) for n in plan.want}
    extra = sorted((k for k in ck.where if k not in used and not plan.unused_ok(k)), key=natural_key)
    if not extra:
        return
    files = sorted({ck.where[k].name for k in extra})
    more = f" and {len(extra) - 4} more" if len(extra) > 4 else ""
    msg = f"the checkpoint holds tensors this config does not use: {extra[:4]}{more} (in {', '.join(files[:3])})"
    layers = [int(m.group(1)) for k in extra if (m := re.search(r"\blayers\.(\d+)\.", k))]
    if layers and max(layers) >= plan.config.n_layers:
        msg += f"; {plan.layers_key} = {plan.config.n_layers} but the checkpoint has {max(layers) + 1} layers"
    raise ConvertError(msg, cfg_path)


def convert_hf(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str = "float16",
    force: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert the Hugging Face model folder SRC into the store DST (written atomically).
    `tokenizer`: a tokenizer.json, or a folder holding one (its tokenizer_config.json supplies the
    chat template), for sources that ship none (OpenELM); it takes precedence over SRC's own.
    Raises ConvertError / UnsupportedModelError naming the offending file."""
    src, dst = Path(src), Path(dst)
    dtype = parse_dtype(dtype)
    if not src.exists():
        raise ConvertError("no such file or folder", src)
    if not src.is_dir():
        raise ConvertError("not a Hugging Face model folder (config.json + *.safetensors)", src)
    check_destination(dst, src, force)  # before any reading; StoreWriter checks again
    cfg_path = src / CONFIG
    if not regular_file(cfg_path):
        raise ConvertError(f"no {CONFIG}: not a Hugging Face model folder", src)
    hf = HFConfig(cfg_path)
    mt = hf.get("model_type")
    if mt not in SUPPORTED:
        raise UnsupportedModelError(f"model_type {mt!r} is not supported (supported: {', '.join(SUPPORTED)})", cfg_path)
    ck = Checkpoint(src)
    plan = {**PLANS, **MOE_PLANS}[mt](hf, ck, src)
    try:
        plan.config.validate()
    except ValueError as e:
        raise ConvertError(f"inconsistent config: {e}", cfg_path) from None
    for name, shape in plan.want.items():  # headers only: fail before writing
        ck.check(name, shape)
    _check_unused(ck, plan, cfg_path)
    tok = read_tokenizer(src, tokenizer, plan.config.vocab_size)
    target = torch.float16 if dtype == "float16" else torch.bfloat16 if dtype == "bfloat16" else torch.float32

    with StoreWriter(dst, plan.config, dtype, source=str(src), force=force, src=src) as w:
        if tok is not None:
            w.write_tokenizer(*tok)
        resident: dict[str, torch.Tensor] = {}
        for i in progress(range(plan.config.n_layers), desc=f"convert {src.name}", total=plan.config.n_layers):
            r, ffn = plan.layer(i)
            resident.update({k: _cast(v, target, k, src) for k, v in r.items()})
            w.write_layer(i, **{k: _cast(v, target, f"layers.{i}.ffn.{k}", src) for k, v in ffn.items()})
        resident.update({k: _cast(v, target, k, src) for k, v in plan.globals().items()})
        w.write_resident(resident)
    return dst
