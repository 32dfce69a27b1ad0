"""Fault injection: reads of ffn.bin that fail (EIO), end early (EOF), come back short, are
interrupted (EINTR) or bring changed bytes, in naive and flash, on both I/O engines. Each is
either retried to the exact same logits or an LlmflashError naming ffn.bin: never a wrong token.

The faults come from the reader's test-only hook (llmflash._native._inject_fault, see
rust/reader/faults.rs), and, where strace is installed and ptrace allowed, from the kernel side
with `strace -e inject=pread64:...` around the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from conftest import flip_bit, tiny_tokenizer_json
from store_builders import tiny_config, write_store

import llmflash._native as native
from llmflash.api import FlashModel
from llmflash.cli import main
from llmflash.errors import FlashIOError, StoreError
from llmflash.store import Store

PROMPT = [3, 17, 5, 9, 42, 7, 8, 11]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(
        tmp_path_factory.mktemp("faults") / "tiny.llmflash", tokenizer=tiny_tokenizer_json(tiny_config().vocab_size)
    )


@contextmanager
def faults(*rules: dict) -> Iterator[list[int]]:
    """Install `rules` (keyword arguments of _inject_fault, on ffn.bin) for the block; yields a
    list that holds, after the block, how many times each rule fired."""
    native._clear_faults()
    fired: list[int] = []
    try:
        for r in rules:
            native._inject_fault(file="ffn.bin", **r)
        yield fired
    finally:
        fired.extend(native._clear_faults())


def uring_works() -> bool:
    try:
        native.Reader(__file__, engine="io_uring")
        return True
    except (OSError, ValueError, RuntimeError):
        return False


MODELS = [("naive", "auto"), ("naive", "threads"), ("flash", "threads"), ("flash", "io_uring")]


def open_model(store: Path, strategy: str, engine: str) -> FlashModel:
    if engine == "io_uring" and not uring_works():
        pytest.skip("io_uring is not available here (kernel or seccomp)")
    if strategy == "naive":
        return FlashModel.open(store, strategy="naive", engine=engine)
    return FlashModel.open(store, strategy="flash", memory="1x", window=2, sparsity="oracle", engine=engine)


@pytest.fixture(scope="module")
def clean(store) -> dict[tuple[str, str], torch.Tensor]:
    """The logits of PROMPT with no fault, per model kind."""
    out = {}
    for strategy, engine in MODELS:
        if engine == "io_uring" and not uring_works():
            continue
        out[strategy, engine] = open_model(store, strategy, engine).logits(PROMPT)
    return out


def region(store: Path, layer: int) -> dict:
    """The payload bytes of one layer's region, as a rule's range."""
    L = Store(store).layers[layer]
    return dict(start=L.offset, end=L.offset + L.payload_bytes)


# -- through the hook: retried to the same logits -------------------------------------------------


@pytest.mark.parametrize("strategy,engine", MODELS)
@pytest.mark.parametrize(
    "rule",
    [
        dict(kind="eintr", times=3),  # interrupted reads are retried
        dict(kind="short", times=2),  # a short read is continued
        dict(kind="short", times=None),  # every read of ffn.bin short: still continued
    ],
    ids=["eintr", "short", "always-short"],
)
def test_transient_faults_give_the_same_logits(store, clean, strategy, engine, rule):
    model = open_model(store, strategy, engine)
    with faults(rule) as fired:
        got = model.logits(PROMPT)
    assert fired[0] >= 1, "the fault never fired"
    assert torch.equal(got, clean[strategy, engine])


# -- through the hook: errors naming ffn.bin ---------------------------------------------------------


@pytest.mark.parametrize("strategy,engine", MODELS)
@pytest.mark.parametrize(
    "rules,match",
    [
        ([dict(kind="eio", times=None)], "Input/output error"),
        ([dict(kind="eof", times=None)], "hit the end of the file after 0 bytes"),
        # A short read, then nothing more: the file ends inside the request.
        ([dict(kind="short", times=1), dict(kind="eof", times=None)], "hit the end of the file after [1-9]"),
    ],
    ids=["eio", "eof", "short-then-eof"],
)
def test_failing_reads_are_flash_io_errors_naming_ffn_bin(store, clean, strategy, engine, rules, match):
    model = open_model(store, strategy, engine)
    with faults(*rules) as fired, pytest.raises(FlashIOError, match=match) as e:
        model.logits(PROMPT)
    assert sum(fired) >= 1
    assert Path(e.value.path).name == "ffn.bin" and "ffn.bin" in str(e.value)
    if rules[0]["kind"] == "eio":
        assert e.value.errno == 5
    after = model.logits(PROMPT)  # the fault gone, the model works again:
    if strategy == "naive":  # naive keeps no state between reads
        assert torch.equal(after, clean[strategy, engine])
    assert torch.isfinite(after).all()


def a_bundle_flash_reads(store: Path, layer: int) -> dict:
    """The byte range of one bundle that flash (oracle) reads for PROMPT in `layer`: one live
    after a clean run reading the same prompt (the reads are deterministic)."""
    m = open_model(store, "flash", "threads")
    m.logits(PROMPT)
    j = int(m.ffn.layers[layer].cache.slot_neurons()[0])
    L = Store(store).layers[layer]
    return dict(start=L.offset + j * L.bundle_bytes, end=L.offset + (j + 1) * L.bundle_bytes)


@pytest.mark.parametrize("strategy,engine", MODELS)
def test_changed_bytes_are_store_errors(store, strategy, engine):
    where = region(store, 1) if strategy == "naive" else a_bundle_flash_reads(store, 1)
    model = open_model(store, strategy, engine)
    with faults(dict(kind="flip", times=None, **where)) as fired, pytest.raises(StoreError) as e:
        model.logits(PROMPT)
    assert fired[0] >= 1
    msg = str(e.value)
    assert "ffn.bin" in msg and "checksum mismatch" in msg
    if strategy == "naive":
        assert "layer 1's region" in msg and f"at offset {Store(store).layers[1].offset}" in msg


def test_naive_checks_every_read_not_only_the_first(store, clean):
    """The first read of layer 1 is intact, the second brings a changed byte: a StoreError."""
    model = open_model(store, "naive", "auto")
    with faults(dict(kind="flip", skip=1, **region(store, 1))) as fired:
        assert torch.equal(model.logits(PROMPT), clean["naive", "auto"])
        with pytest.raises(StoreError, match=r"ffn\.bin.*checksum mismatch in layer 1's region"):
            model.logits(PROMPT)
    assert fired == [1]


def test_the_hook_is_private_and_off_by_default():
    assert native._faults_fired() == []
    assert not [n for n in dir(native) if "fault" in n and not n.startswith("_")]
    with pytest.raises(ValueError, match="fault kind"):
        native._inject_fault("melt")
    assert native._clear_faults() == []


# -- ffn.bin really changed on disk under a running naive model --------------------------------------


@pytest.fixture
def copy(store, tmp_path) -> Path:
    dst = tmp_path / "c.llmflash"
    shutil.copytree(store, dst)
    return dst


def test_ffn_bin_changed_under_a_running_naive_model(copy):
    """After the first token, one bit of layer 1 changes on disk: the next token is a StoreError
    (a region checked only on its first read would give wrong tokens)."""
    model = FlashModel.open(copy, strategy="naive")
    tokens = model.generate_ids(PROMPT, max_new_tokens=5, stop_at_eos=False)
    next(tokens)
    L = Store(copy).layers[1]
    flip_bit(copy / "ffn.bin", L.offset + 25 * 4 + 3)
    with pytest.raises(StoreError, match=rf"ffn\.bin.*checksum mismatch in layer 1's region.*offset {L.offset}"):
        next(tokens)
    with pytest.raises(StoreError, match=r"ffn\.bin.*layer 1"):
        model.logits(PROMPT)


def test_cli_naive_stops_when_ffn_bin_changes_after_the_first_token(store, capsys):
    """The CLI in-process, with layer 1's bytes changed from its second read on (the hook
    stands in for a writer changing the file between two tokens): exit 2, one line."""
    with faults(dict(kind="flip", skip=1, times=None, **region(store, 1))) as fired:
        rc = main(["generate", str(store), "-p", "t1 t2 t3", "-n", "4", "--strategy", "naive"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and fired[0] >= 1
    assert len(err) == 1 and "ffn.bin" in err[0] and "checksum mismatch in layer 1's region" in err[0]


# -- strace: faults injected by the kernel's tracer into the CLI's preads ---------------------------

# The CLI with the I/O engine forced to the pread pool: io_uring reads never call pread.
DRIVER = """
import sys
import llmflash.strategies.flash.setup as flash, llmflash.strategies.naive as naive
from llmflash.io import Reader
def threads(*a, **k):
    return Reader(*a, **{**k, "engine": "threads"})
naive.Reader = flash.Reader = threads
from llmflash.cli import main
sys.exit(main(sys.argv[1:]))
"""


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    r = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True)
    return r.returncode == 0  # fails where ptrace is not permitted


needs_strace = pytest.mark.skipif(not strace_works(), reason="strace absent or ptrace not permitted")


def run_traced(store: Path, strategy: str, inject: str | None, log: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI (pread engine) under strace injecting `inject` into ffn.bin's preads; strace's
    trace of them goes to `log`."""
    args = ["generate", str(store), "-p", "t1 t2 t3", "-n", "4", "--strategy", strategy]
    if strategy == "flash":
        args += ["--memory", "1x", "--sparsity", "oracle"]
    cmd = [sys.executable, "-c", DRIVER, *args]
    if inject is not None:
        # -P: count and inject only the system calls on ffn.bin (not the loader's own preads).
        cmd = [
            "strace",
            "-f",
            "-qq",
            "-o",
            str(log or os.devnull),
            "-P",
            str(store / "ffn.bin"),
            "-e",
            "trace=pread64",
            "-e",
            f"inject=pread64:{inject}",
            *cmd,
        ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "python"), str(Path(__file__).parent)]),
    }
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@needs_strace
@pytest.mark.parametrize("strategy", ["naive", "flash"])
def test_strace_eio_is_one_line_naming_ffn_bin(store, strategy):
    r = run_traced(store, strategy, "error=EIO:when=2+")  # each thread's preads of ffn.bin from its 2nd
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "ffn.bin" in lines[0] and "Input/output error" in lines[0], r.stderr


@needs_strace
@pytest.mark.parametrize("strategy", ["naive", "flash"])
def test_strace_eintr_is_retried_to_the_same_tokens(store, strategy, tmp_path):
    clean = run_traced(store, strategy, None)
    assert clean.returncode == 0 and clean.stdout.strip(), clean.stderr
    r = run_traced(store, strategy, "error=EINTR:when=2..6", tmp_path / "strace.log")
    assert r.returncode == 0, r.stderr
    assert r.stdout == clean.stdout
    assert "EINTR" in (tmp_path / "strace.log").read_text()  # the injection did happen
