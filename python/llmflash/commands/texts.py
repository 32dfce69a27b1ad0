"""The text calibration and evaluation read by default: English prose from CPython's bundled
documentation (pydoc_data.topics, in every CPython). Calibration reads its first
CALIBRATION_CHARS characters, evaluation the topics after them: disjoint by construction."""

from __future__ import annotations

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
