"""FlashFFN's options and the checks that need nothing but their values (compute, window,
concurrency, engine, lookahead), run before anything is read or allocated. The rest is checked
where it is interpreted: `sparsity` and `hot` by sparsity.make_source (which also loads the
predictors), `memory` by budget.parse_memory against the model's size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import InvalidArgumentError, check_int
from ...sparsity import WantedSource

MAX_WINDOW = (1 << 32) - 1  # the native cache counts the window in 32 bits
ENGINES = (None, "auto", "threads", "io_uring")


def check_window(window: Any) -> int:
    """The window as an int in [0, MAX_WINDOW] (0: keep nothing past the token), else InvalidArgumentError."""
    return check_int("window (tokens a neuron stays cached after it was last wanted)", window, 0, MAX_WINDOW)


def lookahead_mode(lookahead: Any) -> str | None:
    """None (no lookahead), "layer" (True: layer+1's reads start while layer computes) or
    "attention" (a layer's reads start before its attention), else InvalidArgumentError."""
    mode = ("layer" if lookahead else None) if isinstance(lookahead, bool) else lookahead
    if mode not in (None, "layer", "attention"):
        raise InvalidArgumentError(f"lookahead must be False, True, 'layer' or 'attention', not {lookahead!r}")
    return mode


@dataclass(frozen=True)
class FlashOptions:
    """What FlashFFN takes besides the store (the keyword arguments of FlashFFN and of
    FlashModel.open(strategy="flash")), checked on construction.

    memory: the budget for weights ("150MB", "0.5x", bytes; None: the whole model).
    window: tokens a neuron stays cached after it was last wanted.
    sparsity: a spec for sparsity.make_source or a source; None: the calibrated predictors
        when the store has them, else the oracle.
    profile: the disk profile pricing reads (None: llmflash.io.load_profile()).
    concurrency: reads in flight (None: 128 on io_uring, 32 with the pread pool).
    overlap: False reads, then computes (to measure what the overlap gains).
    coalesce: False reads only the wanted bundles' pages (neighbours still share a request),
        never bridging a gap or taking one span (the "no coalescing" ablation).
    reuse: False keeps no cache: every wanted neuron streams through the scratch area every
        token (the paper's "predictor only" row).
    engine: "auto", "threads" or "io_uring" (None: io_uring, else the pread pool).
    compute: "live" runs the FFN on every live row, "wanted" on this token's wanted rows only.
    lookahead: False, True or "layer", or "attention" (normalized to None, "layer", "attention").
    hot: the share of each layer's neurons pinned resident (predictors only).
    fill_holes: False closes every hole left by evictions with a move before the reads start
        (the paper's scheme) instead of reading new neurons into the holes.
    device: where the cache rows live and the FFN runs (a torch.device; None: the CPU;
        device_rows.py says how a GPU differs).
    """

    memory: str | int | float | None = None
    window: int = 4
    sparsity: str | WantedSource | None = None
    profile: Any = None
    concurrency: int | None = None
    overlap: bool = True
    coalesce: bool = True
    reuse: bool = True
    engine: str | None = None
    compute: str = "live"
    lookahead: bool | str | None = False
    hot: float = 0.0
    fill_holes: bool = True
    device: Any = None

    def __post_init__(self) -> None:
        if self.compute not in ("live", "wanted"):
            raise InvalidArgumentError(f"compute must be 'live' or 'wanted', not {self.compute!r}")
        object.__setattr__(self, "window", check_window(self.window))
        if self.concurrency is not None:
            check_int("concurrency", self.concurrency, 1, 1 << 16)
        if self.engine not in ENGINES:
            raise InvalidArgumentError(f"engine must be 'auto', 'threads' or 'io_uring', not {self.engine!r}")
        object.__setattr__(self, "lookahead", lookahead_mode(self.lookahead))
