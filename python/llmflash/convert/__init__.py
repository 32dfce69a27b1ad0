"""Converters: a Hugging Face folder or a GGUF file -> an llmflash store."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvertError

GGUF_MAGIC = b"GGUF"


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str = "auto",
    force: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert SRC (HF folder with config.json + *.safetensors, or a .gguf file) into the store DST.
    Written to a temporary sibling folder and renamed when complete. `dtype` "auto" is
    resolve_dtype's choice (a GGUF's own block format where a store can keep it, else float16)."""
    src, dst = Path(src), Path(dst)
    if dtype == "auto":
        dtype = resolve_dtype(src)[0]
    if _source_kind(src) == "hf":
        from .hf import convert_hf

        return convert_hf(src, dst, dtype=dtype, force=force, tokenizer=tokenizer)
    from .gguf import convert_gguf

    return convert_gguf(src, dst, dtype=dtype, force=force)


def resolve_dtype(src: str | os.PathLike[str]) -> tuple[str, str]:
    """What `--dtype auto` converts SRC to, and why (for the user): for a GGUF file, the block
    format that holds most of its FFN's bytes when a quantized store keeps it (q8_0, q4_0, q4_1:
    no second rounding, a store the GGUF's size), else float16; for a Hugging Face folder,
    float16."""
    src = Path(src)
    if _source_kind(src) == "hf":
        return "float16", "a Hugging Face folder converts to float16"
    from .gguf import ffn_block_format

    kind, name = ffn_block_format(src)
    if kind is not None:
        return kind, f"the GGUF's FFN weights are {name} blocks, kept as they are"
    return "float16", f"the GGUF's FFN weights are {name}, which a quantized store does not keep"


def _source_kind(src: Path) -> str:
    """ "hf" (a folder) or "gguf" (a file starting with GGUF's magic or named .gguf); else a
    ConvertError naming the path."""
    if not src.exists():
        raise ConvertError("no such file or folder", src)
    if src.is_dir():
        return "hf"
    from .common import regular_file

    regular_file(src)  # a FIFO or device: an error now, not a blocked open
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror or e})", src) from None
    if magic == GGUF_MAGIC or src.suffix.lower() == ".gguf":
        return "gguf"
    raise ConvertError("neither a model folder (config.json + *.safetensors) nor a GGUF file", src)
