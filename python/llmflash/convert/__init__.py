"""Converters: a Hugging Face folder or a GGUF file -> an llmflash store."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvertError

GGUF_MAGIC = b"GGUF"


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], dtype: str = "float16",
            force: bool = False, tokenizer: str | os.PathLike[str] | None = None) -> Path:
    """Convert SRC (HF folder with config.json + *.safetensors, or a .gguf file) into the store DST.
    Written to a temporary sibling folder and renamed when complete."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConvertError("no such file or folder", src)
    if src.is_dir():
        from .hf import convert_hf
        return convert_hf(src, dst, dtype=dtype, force=force, tokenizer=tokenizer)
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic == GGUF_MAGIC or src.suffix.lower() == ".gguf":
        from .gguf import convert_gguf
        return convert_gguf(src, dst, dtype=dtype, force=force)
    raise ConvertError("neither a model folder (config.json + *.safetensors) nor a GGUF file", src)
