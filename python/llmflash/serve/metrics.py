"""What the server tells about its work: one log line per request (tokens, tokens/s, the flash
statistics of that request: bytes read, cache hit rate) and the running totals behind /metrics,
in Prometheus' text format."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("llmflash.serve")

OUTCOMES = ("stop", "length", "cancelled", "timeout", "error")


@dataclass
class RequestRecord:
    kind: str
    prompt_tokens: int
    queued_s: float
    completion_tokens: int = 0
    first_token_s: float = 0.0
    total_s: float = 0.0
    bytes_read: float = 0.0
    hits: float = 0.0
    misses: float = 0.0

    def add_flash(self, before: dict[str, Any], after: dict[str, Any]) -> None:
        """This request's share of the strategy's counters (bytes read from flash, neuron or
        expert cache hits and misses): the difference of two snapshots."""

        def delta(key: str) -> float:
            return float(after.get(key, 0.0)) - float(before.get(key, 0.0))

        self.bytes_read, self.hits, self.misses = delta("bytes_read"), delta("hits"), delta("misses")

    def decode_tok_per_s(self) -> float:
        decode_s = self.total_s - self.first_token_s
        return (self.completion_tokens - 1) / decode_s if self.completion_tokens > 1 and decode_s > 0 else 0.0

    def line(self, outcome: str) -> str:
        looked = self.hits + self.misses
        hit = f" hit={self.hits / looked:.2f}" if looked else ""
        return (
            f"{self.kind} {outcome}: prompt={self.prompt_tokens} completion={self.completion_tokens} "
            f"queued={self.queued_s:.2f}s first_token={self.first_token_s:.2f}s total={self.total_s:.2f}s "
            f"decode={self.decode_tok_per_s():.1f}tok/s read={self.bytes_read / 1e6:.1f}MB{hit}"
        )


class Metrics:
    """Totals since the server started; the worker adds to them, /metrics reads them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.refused = 0  # 503: the queue was full
        self.cancelled = 0  # jobs whose clients left while they waited
        self.prompt_tokens = self.completion_tokens = 0
        self.busy_s = self.bytes_read = self.hits = self.misses = 0.0

    def finish(self, record: RequestRecord, outcome: str) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            self.prompt_tokens += record.prompt_tokens
            self.completion_tokens += record.completion_tokens
            self.busy_s += record.total_s
            self.bytes_read += record.bytes_read
            self.hits += record.hits
            self.misses += record.misses
        log.info("%s", record.line(outcome))

    def prometheus(self, waiting: int, running: int, strategy: str) -> str:
        """The totals in Prometheus' text exposition format."""
        with self._lock:
            rows = [
                ("requests_total", "counter", "requests finished, by outcome", None),
                *[(f'requests_total{{outcome="{k}"}}', None, None, v) for k, v in self.outcomes.items()],
                ("requests_refused_total", "counter", "requests refused with 503: the queue was full", self.refused),
                ("requests_dropped_total", "counter", "requests whose clients left while queued", self.cancelled),
                ("queue_waiting", "gauge", "requests waiting for the model", waiting),
                ("queue_running", "gauge", "requests being generated (0 or 1)", running),
                ("prompt_tokens_total", "counter", "prompt tokens prefilled", self.prompt_tokens),
                ("completion_tokens_total", "counter", "tokens generated", self.completion_tokens),
                ("generation_seconds_total", "counter", "seconds spent generating", self.busy_s),
                ("flash_bytes_read_total", "counter", f"bytes read from flash ({strategy})", self.bytes_read),
                ("flash_cache_hits_total", "counter", "neurons or experts found in the cache", self.hits),
                ("flash_cache_misses_total", "counter", "neurons or experts read from flash", self.misses),
                ("process_resident_bytes", "gauge", "the server's resident memory", resident_bytes()),
            ]
        out = []
        for name, kind, help_, value in rows:
            if kind is not None:
                base = name.split("{")[0]
                out += [f"# HELP llmflash_{base} {help_}", f"# TYPE llmflash_{base} {kind}"]
            if value is not None:
                out.append(f"llmflash_{name} {value!r}")  # repr: every digit of a float
        return "\n".join(out) + "\n"


def resident_bytes() -> int:
    """This process's resident set (VmRSS), 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
