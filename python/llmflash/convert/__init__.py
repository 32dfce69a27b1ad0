"""Converters: a Hugging Face folder or a GGUF file -> an llmflash store."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvertError

GGUF_MAGIC = b"GGUF"


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    dtype: str = "float16",
    force: bool = False,
    tokenizer: str | os.PathLike[str] | None = None,
) -> Path:
    """Convert SRC (HF folder with config.json + *.safetensors, or a .gguf file) into the store DST.
    Written to a temporary sibling folder and renamed when complete."""
    src, dst = Path(src), Path(dst)
    if not src.exists():
        raise ConvertError("no such file or folder", src)
    if src.is_dir():
        from .hf import convert_hf

        return convert_hf(src, dst, dtype=dtype, force=force, tokenizer=tokenizer)
    from .common import regular_file

    regular_file(src)  # a FIFO or device: an error now, not a blocked open
    try:
        with open(src, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ConvertError(f"cannot read ({e.strerror or e})", src) from None
    if magic == GGUF_MAGIC or src.suffix.lower() == ".gguf":
        from .gguf import convert_gguf

        return convert_gguf(src, dst, dtype=dtype, force=force)
    raise ConvertError("neither a model folder (config.json + *.safetensors) nor a GGUF file", src)
