"""Text files given on the command line (`eval --text`, `calibrate --text`): only regular files
are read (a FIFO could block forever, a device such as /dev/zero never ends), and an evaluation
reads only as far as the tokens it asks for."""

from __future__ import annotations

import codecs
import os
import stat
from typing import Any

from .errors import LlmflashError


def check_text_file(path: str | os.PathLike[str], what: str = "evaluation text") -> None:
    """LlmflashError naming `path` unless it is a regular file (a FIFO, a device or a folder
    could block or never end)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise LlmflashError(f"cannot read {what}: {e.strerror}", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise LlmflashError(f"{what} must be a regular file (not a FIFO, device or folder)", path)


def read_text_for_tokens(
    path: str | os.PathLike[str], tokenizer: Any, tokens: int, first_chunk: int = 1 << 16, what: str = "evaluation text"
) -> str:
    """The start of the text file `path` (UTF-8, bad bytes replaced), read in growing chunks only
    until it holds more than `tokens` tokens or ends: a huge file costs what the evaluation uses.
    Not a regular file: LlmflashError (check_text_file)."""
    check_text_file(path, what)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, chunk = "", first_chunk
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(chunk)
                text += decoder.decode(data, final=not data)
                # more than `tokens`: the last one wanted is complete, not cut at the chunk's end
                if not data or len(tokenizer.encode(text).ids) > tokens:
                    return text
                chunk *= 2
    except OSError as e:
        raise LlmflashError(f"cannot read {what}: {e.strerror}", path) from None
