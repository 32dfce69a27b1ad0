"""One model, one decode at a time: a bounded FIFO of jobs and the worker thread that runs them.

The event loop only enqueues a job and reads its events; the decode runs here, in a thread of
its own (torch and the Rust core release the GIL while they work), so a long generation never
stalls the other connections. A job that waits while the queue already holds `queue` jobs is
refused (503): the server stays answerable under any load instead of piling up work it will
time out on. A job whose client went away, or whose deadline passed, is stopped between two
tokens, and its slot goes to the next one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..api import FlashModel
from ..errors import LlmflashError
from ..generation import IncrementalDecoder
from .metrics import Metrics, RequestRecord
from .protocol import RequestError
from .stops import StopMatcher

log = logging.getLogger("llmflash.serve")


@dataclass
class Job:
    """One request's generation. The worker puts ("text", str), ("end", finish_reason) or
    ("error", RequestError) on `events`, in the event loop's thread."""

    kind: str  # "chat" or "completion", for the log line
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    timeout: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)
    completion_tokens: int = 0

    def cancel(self) -> None:
        """The client went away: stop at the next token (or never start)."""
        self.cancelled.set()

    def expired(self) -> bool:
        return time.monotonic() - self.arrived > self.timeout

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is shutting down
            self.cancel()


class Engine:
    def __init__(self, model: FlashModel, queue: int, metrics: Metrics):
        self.model, self.capacity, self.metrics = model, queue, metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self.running: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="llmflash-decode", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue `job`; a RequestError (503) when `queue` jobs already wait."""
        with self._cond:
            self._drop_cancelled()
            if self._closed or len(self._waiting) + (self.running is not None) > self.capacity:
                self.metrics.refused += 1
                raise RequestError(
                    f"the server is busy: one request is generated and {self.capacity} wait, its limit; retry later",
                    status=503,
                    code="queue_full",
                    type="server_error",
                    headers={"Retry-After": "1"},
                )
            self._waiting.append(job)
            self._cond.notify()

    def depth(self) -> tuple[int, int]:
        """(jobs waiting, jobs running)."""
        with self._cond:
            self._drop_cancelled()
            return len(self._waiting), int(self.running is not None)

    def close(self) -> None:
        """Stop taking jobs; the waiting ones and the running one are cancelled."""
        with self._cond:
            self._closed = True
            for job in self._waiting:
                job.cancel()
            if self.running is not None:
                self.running.cancel()
            self._cond.notify()

    def _drop_cancelled(self) -> None:
        """Waiting jobs whose clients left give up their places at once (under the lock)."""
        if any(j.cancelled.is_set() for j in self._waiting):
            kept = [j for j in self._waiting if not j.cancelled.is_set()]
            self.metrics.cancelled += len(self._waiting) - len(kept)
            self._waiting = collections.deque(kept)

    # -- the worker -------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                job = self._waiting.popleft()
                if job.cancelled.is_set():
                    self.metrics.cancelled += 1
                    continue
                self.running = job
            record = RequestRecord(job.kind, len(job.ids), queued_s=time.monotonic() - job.arrived)
            try:
                outcome, last = self._run(job, record)
            except Exception as e:  # never lose the worker: the job gets a 500, the log the traceback
                log.exception("generation failed")
                failure = RequestError(f"generation failed: {type(e).__name__}", 500, type="server_error")
                outcome, last = "error", ("error", failure)
            # The slot is free before the job's last event, so that a client sending its next
            # request on reading the answer finds it free.
            with self._cond:
                self.running = None
            self.metrics.finish(record, outcome)
            if last is not None:
                job.emit(*last)

    def _run(self, job: Job, record: RequestRecord) -> tuple[str, tuple | None]:
        """Generate `job`, sending its text as it comes; returns the outcome and the last event
        (None for a cancelled job: nobody reads it), which the caller sends once the slot is free."""
        if job.expired():
            return "timeout", ("error", timeout_error(job.timeout))
        before = self.model.stats()
        t0 = time.perf_counter()
        dec, stops = IncrementalDecoder(self.model.tokenizer), StopMatcher(job.stops)
        outcome = "length"
        try:
            tokens = self.model.generate_ids(job.ids, job.max_tokens, job.temperature, job.top_p, job.seed)
            for tok in tokens:
                job.completion_tokens += 1
                if job.completion_tokens == 1:
                    record.first_token_s = time.perf_counter() - t0
                text = stops.push(dec.push(tok))
                if text:
                    job.emit("text", text)
                if stops.stopped:
                    outcome = "stop"
                    break
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
                if job.expired():
                    outcome = "timeout"
                    break
            else:
                if job.completion_tokens < job.max_tokens:
                    outcome = "stop"  # the model's end of sequence
            if outcome in ("stop", "length") and not stops.stopped:
                text = stops.push(dec.flush())
                text += stops.flush()
                if text:
                    job.emit("text", text)
        except LlmflashError as e:  # a store that turned bad under us (a failed or corrupt read)
            log.error("generation failed: %s", e)
            outcome, failure = "error", RequestError(f"generation failed: {e}", 500, type="server_error")
        record.completion_tokens = job.completion_tokens
        record.total_s = time.perf_counter() - t0
        record.add_flash(before, self.model.stats())
        if outcome == "cancelled":
            return outcome, None
        if outcome == "timeout":
            return outcome, ("error", timeout_error(job.timeout))
        if outcome == "error":
            return outcome, ("error", failure)
        return outcome, ("end", outcome)


def timeout_error(seconds: float) -> RequestError:
    return RequestError(
        f"the request ran past this server's {seconds:g} s limit", 504, code="timeout", type="server_error"
    )
