"""Type stubs for llmflash._native, the Rust I/O core (rust/py/). Private: use llmflash.io."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np
import numpy.typing as npt

ALIGN: int  # 4096: direct-I/O alignment of offsets, lengths and buffers
DEFAULT_CONCURRENCY: int  # 32 reads in flight
MAX_CONCURRENCY: int  # 1024

_Path = Union[str, os.PathLike[str]]
_Ids = Union[npt.NDArray[np.integer], Sequence[int]]

class AlignedBuf:
    """A zeroed, 4096-byte-aligned byte buffer owned by Rust. Supports the buffer protocol
    (writable, format "B"): np.asarray(buf), memoryview(buf), torch.frombuffer(buf, dtype=...)
    view it without copying, and each view keeps it alive."""

    def __init__(self, length: int) -> None: ...
    @property
    def address(self) -> int: ...  # address of byte 0 (== a zero-copy tensor's data_ptr())
    @property
    def capacity(self) -> int: ...  # length rounded up to 4096
    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class Profile:
    """Disk cost profile: MB/s by request size x requests in flight (the paper's Figure 2)."""

    def __init__(
        self, sizes: Sequence[int], concurrencies: Sequence[int], mbps: Sequence[Sequence[float]], source: str = ""
    ) -> None: ...
    @staticmethod
    def default() -> Profile: ...  # fio table of the reference machine
    @staticmethod
    def load(path: _Path) -> Profile: ...  # ValueError if malformed, FlashIOError if unreadable
    @staticmethod
    def from_json(text: str) -> Profile: ...
    def to_json(self) -> str: ...
    def save(self, path: _Path) -> None: ...
    @property
    def sizes(self) -> list[int]: ...
    @property
    def concurrencies(self) -> list[int]: ...
    @property
    def mbps(self) -> list[list[float]]: ...  # mbps[i][j]: sizes[i] at concurrencies[j]
    @property
    def source(self) -> str: ...
    def throughput_mbps(self, size: int, concurrency: int) -> float: ...
    def request_seconds(self, size: int, concurrency: int) -> float: ...
    def bridge_gap_bytes(self, concurrency: int = 32) -> int: ...

class Plan:
    """Aligned reads covering a set of wanted neurons of one layer region."""

    @property
    def requests(self) -> list[tuple[int, int, int]]: ...  # (file_offset, length, dest_offset)
    @property
    def neurons(self) -> npt.NDArray[np.int64]: ...  # unique wanted ids, sorted
    @property
    def landing(self) -> npt.NDArray[np.int64]: ...  # bundle start in the plan's buffer
    @property
    def request_index(self) -> npt.NDArray[np.int64]: ...  # request holding the first byte
    @property
    def offset_in_request(self) -> npt.NDArray[np.int64]: ...
    @property
    def buffer_bytes(self) -> int: ...  # bytes read == buffer size needed
    @property
    def useful_bytes(self) -> int: ...  # len(neurons) * bundle_bytes
    @property
    def max_gap_bytes(self) -> int: ...  # widest gap bridged by the sparse plan
    @property
    def whole_region(self) -> bool: ...  # one span (first to last wanted page) was cheaper than sparse reads
    @property
    def est_seconds(self) -> float: ...
    @property
    def est_sparse_seconds(self) -> float: ...
    @property
    def est_whole_seconds(self) -> float: ...
    @property
    def bundle_bytes(self) -> int: ...
    @property
    def region_offset(self) -> int: ...
    @property
    def n_neurons(self) -> int: ...
    def __len__(self) -> int: ...  # number of requests
    def gather(self, buf: AlignedBuf) -> AlignedBuf: ...  # rows of bundle_bytes, row k = neurons[k]

def combine_crcs(crcs: npt.NDArray[np.uint32], group: int, bundle_bytes: int) -> npt.NDArray[np.uint32]: ...
def plan(
    wanted: _Ids,
    bundle_bytes: int,
    region_offset: int,
    n_neurons: int,
    profile: Optional[Profile] = None,
    max_request_bytes: int = 1048576,
    concurrency: int = 32,
    allow_whole: bool = True,
    max_gap_bytes: Optional[int] = None,
) -> Plan:
    """Plan reads of `wanted` (store positions, any order, duplicates allowed). ValueError for ids
    out of range or bad options; StoreError for an impossible region (misaligned, overflowing)."""
    ...

class Reader:
    """One file read with O_DIRECT by a persistent pool of `concurrency` pread threads. Every
    read releases the GIL; failures raise FlashIOError naming the file, offset and length."""

    def __init__(
        self,
        path: _Path,
        concurrency: int = 32,
        direct: bool = True,
        engine: Literal["auto", "threads", "io_uring"] = "auto",
    ) -> None: ...
    @property
    def engine(self) -> Literal["auto", "threads", "io_uring"]: ...
    @property
    def path(self) -> pathlib.Path: ...
    @property
    def direct(self) -> bool: ...  # False: the filesystem refused O_DIRECT (warned)
    @property
    def concurrency(self) -> int: ...
    def file_size(self) -> int: ...
    def read(self, requests: Sequence[tuple[int, int, AlignedBuf, int]]) -> None: ...
    def read_region(self, offset: int, length: int) -> AlignedBuf: ...
    def read_region_checked(
        self, offset: int, length: int, out: AlignedBuf, crc_bytes: int, crc32: int, what: str = "region"
    ) -> None: ...
    #   out[:length] = the bytes at offset, hashed request by request as they land; StoreError
    #   (naming the file, `what` and offset) unless zlib.crc32 of out[:crc_bytes] == crc32
    def read_plan(self, plan: Plan, out: Optional[AlignedBuf] = None) -> AlignedBuf: ...
    def stats(self) -> dict[str, int]: ...  # bytes_read, bytes_useful, requests, batches, io_ns
    def reset_stats(self) -> None: ...

class Admission:
    """What one NeuronCache.begin did."""

    @property
    def epoch(self) -> int: ...
    @property
    def ready_rows(self) -> int: ...  # rows [0, ready_rows) valid now, stable until next begin
    @property
    def total_rows(self) -> int: ...  # rows [ready_rows, total_rows) valid after wait()
    @property
    def hits(self) -> int: ...  # unique wanted neurons already live
    @property
    def misses(self) -> int: ...  # read into rows now (missing, unique, fitting)
    @property
    def overflow(self) -> npt.NDArray[np.int64]: ...  # did not fit: stream with read_neurons
    @property
    def moves(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]: ...  # external rows:
    #   (dst, src): apply rows[dst[i]] = rows[src[i]] in order before using the rows
    @property
    def evicted_window(self) -> int: ...
    @property
    def evicted_capacity(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...  # the fill plan's buffer_bytes (gaps, padding included)
    @property
    def bytes_useful(self) -> int: ...  # misses * bundle_bytes
    @property
    def requests(self) -> int: ...
    @property
    def whole_region(self) -> bool: ...
    @property
    def est_seconds(self) -> float: ...
    @property
    def filled_rows(self) -> npt.NDArray[np.int64]: ...  # rows being filled, ascending, in [ready_rows, total_rows)

class NeuronCache:
    """One FFN layer's neuron cache: a slot matrix of `capacity` bundles whose live rows are
    always the block [0, live). Neurons not wanted in the last `window` steps are evicted; under
    capacity pressure the least recently wanted neurons not wanted now go first (ties: lower id).
    Deletion moves the last live row into the hole; insertion appends. Mutating methods must be
    called from one thread at a time; every blocking call releases the GIL."""

    def __init__(
        self,
        reader: Reader,
        region_offset: int,
        n_neurons: int,
        bundle_bytes: int,
        capacity: int,
        window: int,
        profile: Optional[Profile] = None,
        max_request_bytes: int = 1048576,
        concurrency: Optional[int] = None,
        allow_whole: bool = True,
        max_gap_bytes: Optional[int] = None,
        external_rows: bool = False,  # rows kept by the caller: Admission.moves, take_landed()
    ) -> None: ...
    def begin(self, wanted: _Ids, step: int) -> Admission: ...  # evict, plan, start reads
    def wait(self) -> None: ...  # FlashIOError / StoreError (CRC): the fill's neurons were removed
    def begin_guess(self, wanted: _Ids, step: int) -> Admission: ...  # begin for a lookahead guess:
    #   its neurons count as wanted at step - 1, so the check at `step` may evict the wrong ones
    def admit(self, wanted: _Ids, step: int) -> Admission: ...  # begin + wait, inline
    def read_neurons(self, wanted: _Ids, out: AlignedBuf) -> int: ...  # row k = wanted[k]
    def overflow_reader(self) -> OverflowReader: ...  # read_neurons for another thread
    def set_bundle_crcs(self, crcs: Union[npt.NDArray[np.uint32], Sequence[int]]) -> None: ...
    #   crcs[j] = zlib.crc32 of bundle j; n_neurons entries; set once. From then on a bundle read
    #   whose CRC differs raises StoreError (wait/admit/begin drop the fill's neurons; read_neurons)
    @property
    def has_bundle_crcs(self) -> bool: ...
    @property
    def external_rows(self) -> bool: ...
    def landed(self) -> Optional[AlignedBuf]: ...  # external rows, after wait(): row k of
    #   bundle_bytes = the bundle of Admission.filled_rows[k]
    def take_landed(self) -> Optional[AlignedBuf]: ...  # landed(), marked taken once copied; the
    #   next admission drops the neurons of bundles never taken
    @property
    def slots(self) -> AlignedBuf: ...  # capacity * bundle_bytes bytes, zero-copy, same object
    @property
    def live(self) -> int: ...
    @property
    def ready_rows(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def window(self) -> int: ...
    @window.setter
    def window(self, window: int) -> None: ...
    @property
    def fill_holes(self) -> bool: ...  # new neurons take evicted rows (no move); see rust/cache.rs
    @fill_holes.setter
    def fill_holes(self, on: bool) -> None: ...
    @property
    def n_neurons(self) -> int: ...
    @property
    def bundle_bytes(self) -> int: ...
    @property
    def region_offset(self) -> int: ...
    @property
    def pending(self) -> bool: ...  # a fill was started and not yet waited for
    def is_ready(self) -> bool: ...  # wait() would not block
    def slot_neurons(self) -> npt.NDArray[np.int64]: ...  # row -> store position, rows [0, live)
    def rows_of(self, wanted: _Ids) -> npt.NDArray[np.int64]: ...  # -1 where not live
    def contains(self, neuron: int) -> bool: ...
    def __contains__(self, neuron: int) -> bool: ...
    def __len__(self) -> int: ...  # live
    def row_states(self) -> npt.NDArray[np.uint8]: ...  # 0 empty, 1 filling, 2 ready
    def stats(self) -> dict[str, int]: ...  # admissions, hits, misses, overflow, evicted_window,
    #   evicted_capacity, bytes_read, bytes_useful, bytes_direct, requests, failed_fills, io_ns,
    #   wait_ns, mgmt_ns, crc_ns (the part of mgmt_ns spent on CRC checks)
    def reset_stats(self) -> None: ...

def measure_point(path: _Path, size: int, concurrency: int, seconds: float) -> float: ...
def measure(path: _Path, sizes: Sequence[int], concurrencies: Sequence[int], seconds_per_point: float) -> Profile: ...
def f16_rows_gemv(rows: np.ndarray, h: np.ndarray, threads: int = 2) -> np.ndarray:
    """(D,) float32 = sum_i h[i] * rows[i]: rows (n, D) int16 float16 bit patterns, unit column
    stride, aligned; h (n,) float32. Without the GIL."""
    ...

def f16_bundle_ffn(
    rows: np.ndarray,
    x: np.ndarray,
    gated: bool,
    bias: Optional[np.ndarray] = None,
    threads: int = 2,
    pick: Optional[np.ndarray] = None,
) -> np.ndarray:
    """One decode token's FFN over float16 bundle rows (n, >= fields * D) int16 view: relu(up.x + bias)
    or silu(gate.x) * (up.x), times the down rows, summed: (D,) float32. `pick` (k,) uint32: only
    those rows (bias still indexed by row). Without the GIL."""
    ...

def f16_matvec(w: np.ndarray, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """(out,) float32 = w @ x: w (out, in) int16 float16 bit patterns (any row stride, unit column
    stride), x (in,) float32; the decode product of a projection. Without the GIL."""
    ...

def q_matvec(kind: Literal["q8_0", "q4_0", "q4_1"], w: np.ndarray, x: np.ndarray, threads: int = 2) -> np.ndarray:
    """(rows,) float32 = W @ x: w (rows, row_bytes) uint8 C-contiguous, each row x.size / 32 GGML
    blocks of `kind` back to back; x (cols,) float32, cols a multiple of 32. The decode product of
    a resident quantized matrix (attention, LM head). Without the GIL."""
    ...

def q_bundle_ffn(
    kind: Literal["q8_0", "q4_0", "q4_1"],
    rows: np.ndarray,
    x: np.ndarray,
    gated: bool,
    down_scale: np.ndarray,
    down_min: Optional[np.ndarray] = None,
    bias: Optional[np.ndarray] = None,
    threads: int = 2,
    pick: Optional[np.ndarray] = None,
) -> np.ndarray:
    """One decode token's FFN over quantized bundles: rows (n, >= bundle bytes) uint8 (any row
    stride, unit column stride), each [gate] up as blocks of `kind`, the down column's raw
    integers and the u32 group (store/layout.py, version 6); gated: silu(gate.x) * (up.x), plain:
    relu(up.x + bias). down_scale (and down_min, q4_1): the layer's (groups, dim) uint16 float16
    bits. Returns sum_i h_i * down_i, (D,) float32, skipping bundles where h_i == 0. `pick` (k,)
    uint32: only those bundles (bias still indexed by bundle). Without the GIL."""
    ...

def q_bundle_dequantize(
    kind: Literal["q8_0", "q4_0", "q4_1"],
    rows: np.ndarray,
    dim: int,
    gated: bool,
    down_scale: np.ndarray,
    down_min: Optional[np.ndarray] = None,
) -> np.ndarray:
    """The float32 values of quantized bundles (as q_bundle_ffn's rows) of width `dim`:
    (n * fields * dim,) with bundle i's [gate,] up, down in turn. Without the GIL."""
    ...

def q_dequantize(kind: Literal["q8_0", "q4_0", "q4_1"], blocks: np.ndarray, n_values: int) -> np.ndarray:
    """(n_values,) float32: the values of `blocks`, a 1-D uint8 array of exactly n_values / 32
    blocks of `kind` (n_values a multiple of 32)."""
    ...

def q_set_portable(on: bool) -> bool:
    """Force the quantized kernels' portable path (True) or let the CPU decide (False),
    process-wide; returns the previous setting (tests compare both paths)."""
    ...

def q_simd() -> Literal["avx2", "portable"]:
    """The path the quantized kernels take now."""
    ...

def attend_one(q: np.ndarray, k: np.ndarray, v: np.ndarray, length: int, scale: float, threads: int = 2) -> np.ndarray:
    """One query position's attention: q (Hq, hd) float32; k, v (Hkv, capacity, hd) int16 float16
    bit patterns or float32, C-contiguous, positions [0, length) filled; query head h reads KV head
    h // (Hq // Hkv). Returns (Hq * hd,) float32. Without the GIL."""
    ...

class OverflowReader:
    """A cache's read_neurons() usable from another thread while the cache's owner calls begin(),
    wait() or admit() (it shares the reader, CRC table and counters, touches no row)."""

    def read(self, wanted: _Ids, out: AlignedBuf) -> int: ...  # row k = wanted[k]; GIL released

class QAttention:
    """One quantized layer's attention half for one decode token: q, k, v, o as (rows, row_bytes)
    uint8 arrays of `kind` blocks, float32 norms, optional float32 biases (q, k, v, o) and
    per-head q/k norms (OpenELM). Shapes are checked once, here (InvalidArgumentError)."""

    def __init__(
        self,
        kind: Literal["q8_0", "q4_0", "q4_1"],
        q: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        o: np.ndarray,
        attn_norm: np.ndarray,
        ffn_norm: np.ndarray,
        heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        bias: Optional[Sequence[Optional[np.ndarray]]] = None,
        qk_norm: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> None: ...
    def step(
        self,
        x: np.ndarray,
        pos: int,
        k: np.ndarray,
        v: np.ndarray,
        cos: Optional[np.ndarray] = None,
        sin: Optional[np.ndarray] = None,
        threads: int = 1,
    ) -> np.ndarray:
        """x (dim,) float32 gains the attention's output in place; the token's keys and values go
        into k, v ((kv_heads, capacity, head_dim) float32) at `pos`; cos, sin (head_dim,) are
        RoPE's rows for `pos`. Returns rms_norm(x, ffn_norm). Without the GIL."""
        ...

class QDecoder:
    """A quantized gated model's layers for one decode token: each layer's QAttention, then its
    FFN w1 (gate rows then up rows, 2n x row bytes) and w2 (dim x row bytes), `kind` blocks;
    shapes checked here (InvalidArgumentError)."""

    def __init__(
        self,
        kind: Literal["q8_0", "q4_0", "q4_1"],
        attn: Sequence[QAttention],
        w1: Sequence[np.ndarray],
        w2: Sequence[np.ndarray],
    ) -> None: ...
    def run(
        self,
        x: np.ndarray,
        pos: int,
        k: Sequence[np.ndarray],
        v: Sequence[np.ndarray],
        cos: Optional[np.ndarray] = None,
        sin: Optional[np.ndarray] = None,
        threads: int = 1,
    ) -> None:
        """x (dim,) float32 through every layer in place (attention half, then x += W2 (silu(g) * u));
        k[i], v[i] layer i's cache as QAttention.step takes it. Without the GIL."""
        ...

# -- test-only: the reader's fault-injection hook (tests/test_faults.py); never used by the package --

def _inject_fault(
    kind: Literal["eio", "eintr", "eof", "short", "flip"],
    file: str = "",
    start: int = 0,
    end: int = 2**64 - 1,
    skip: int = 0,
    times: Optional[int] = 1,
) -> int:
    """Make reads (a pread, or an io_uring completion) of files whose path ends with `file` that
    meet bytes [start, end) fail with EIO or EINTR, return 0 bytes ("eof"), return about half
    ("short"), or bring their first byte in the range inverted ("flip"): after `skip` such reads,
    `times` times (None: always). Process-wide until _clear_faults(). Returns the rule's index."""
    ...

def _clear_faults() -> list[int]: ...  # remove every rule; how many times each fired
def _faults_fired() -> list[int]: ...  # how many times each installed rule has fired
