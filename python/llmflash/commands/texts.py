"""The text calibration, placement and evaluation read by default: English prose from CPython's
bundled documentation (pydoc_data.topics, in every CPython). Calibration and placement read its
first CALIBRATION_CHARS characters, evaluation the topics after them: disjoint by construction.
Also the reading and tokenizing of the text files those commands are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LlmflashError
from ..textfile import check_text_file

CALIBRATION_CHARS = 360_000  # pydoc topics text [0, 360000) calibrates; eval reads from here on


def calibration_text(n_chars: int = 200_000, offset: int = 0) -> str:
    """`n_chars` characters of the documentation topics (sorted, joined by blank lines) from `offset`."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[offset : offset + n_chars]


def default_text() -> str:
    """What `llmflash calibrate` reads without --text."""
    return calibration_text(CALIBRATION_CHARS, offset=0)


def heldout_text(n_chars: int = 200_000) -> str:
    """Documentation text disjoint from calibrate's default: the topics (joined as in
    calibration_text) that start at or after CALIBRATION_CHARS, so evaluation begins on a
    topic's first line rather than in the middle of the one calibration cut."""
    from pydoc_data.topics import topics

    start = 0
    for key in sorted(topics):
        if start >= CALIBRATION_CHARS:
            break
        start += len(topics[key]) + 2  # "\n\n" joins the topics
    return calibration_text(n_chars, offset=max(start, CALIBRATION_CHARS))


def token_ids(store: Any, texts: list[str]) -> list[int]:
    """The texts tokenized by the store's tokenizer, one after the other, ids outside the model's
    vocabulary dropped; LlmflashError naming the store when it has no tokenizer."""
    tok = store.tokenizer()
    if tok is None:
        raise LlmflashError("the store has no tokenizer.json, so it cannot tokenize calibration text", store.path)
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids
    return [i for i in ids if 0 <= i < store.config.vocab_size]


def read_texts(files: list[str] | None) -> list[str] | None:
    """The text files' contents (UTF-8, bad bytes replaced), or None without files; a file that
    is not a readable regular file is an LlmflashError naming it."""
    if not files:
        return None
    texts = []
    for f in files:
        check_text_file(f, "calibration text")
        try:
            texts.append(Path(f).read_text(encoding="utf-8", errors="replace"))
        except OSError as e:
            raise LlmflashError(f"cannot read calibration text: {e.strerror}", f) from None
    return texts
