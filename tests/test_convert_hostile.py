"""Hostile conversion sources: GGUF tensor tables whose types or offsets disagree with the bytes,
non-finite weights, counts no model has, checkpoints holding tensors their config does not use,
and FIFOs, devices or folders where a file is expected. Each is a ConvertError naming the file
(and the tensor or key), and through the CLI exit code 2 with one stderr line; none hangs,
allocates by the claimed count, or writes a store."""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import pytest
from conftest import build_hf, tiny_tokenizer_json
from gguf_builders import DIM, TYPES, Q, write_tiny_gguf
from safetensors.torch import load_file, save_file

from llmflash.cli import main
from llmflash.convert import convert
from llmflash.errors import ConvertError

gguf = pytest.importorskip("gguf")

T = TypeVar("T")


def outcome(src: Path, dst: Path, **kw) -> tuple[str | None, int, str]:
    """convert(src, dst) and `llmflash convert src dst`: (the ConvertError's message or None,
    the CLI's exit code, its stderr)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(src, dst, **kw)
        message = None
    except ConvertError as e:
        message = str(e)
    err = io.StringIO()
    extra = [f"--tokenizer={kw['tokenizer']}"] if "tokenizer" in kw else []
    extra += [f"--dtype={kw['dtype']}"] if "dtype" in kw else []
    with contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["convert", str(src), str(dst), *extra])
    return message, rc, err.getvalue()


def in_child(fn: Callable[[], T], timeout: float = 60) -> T:
    """fn() in a forked child, killed after `timeout`: a regression that blocks opening a FIFO
    (in native code, holding the GIL) then fails the test instead of hanging the suite."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def run() -> None:
        try:
            send.send((True, fn()))
        except BaseException as e:  # reported to the parent
            send.send((False, f"{type(e).__name__}: {e}"))

    child = ctx.Process(target=run, daemon=True)
    child.start()
    if not recv.poll(timeout):
        child.kill()
        child.join()
        pytest.fail(f"blocked for {timeout} s")
    ok, value = recv.recv()
    child.join()
    assert ok, value
    return value


def assert_refused(src: Path, dst: Path, *words: str, child: bool = False, **kw) -> None:
    """convert() raises a ConvertError holding every word; the CLI exits 2 with one stderr line
    holding them; no store or temporary folder is left. child: run both in a forked child."""
    message, rc, err = in_child(lambda: outcome(src, dst, **kw)) if child else outcome(src, dst, **kw)
    assert message is not None, "converted without an error"
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("llmflash: error: "), (rc, err)
    for w in words:
        assert w in message and w in lines[0], (w, message, lines[0])
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]


# -- GGUF: the tensor table against the bytes ---------------------------------------------------------


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def tensor_info(path: Path, name: str) -> tuple[int, int, int, int]:
    """File positions of tensor `name`'s first dimension, type id and data offset in the tensor
    table, and where its data starts."""
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    dims = t.field.offset + 8 + len(name.encode()) + 4
    kind = dims + 8 * len(t.shape)
    return dims, kind, kind + 4, int(t.data_offset)


def patched(good: Path, tmp: Path, edits: list[tuple[int, str, int]]) -> Path:
    """A copy of `good` with struct-packed little-endian values written at the given positions."""
    data = bytearray(good.read_bytes())
    for pos, fmt, value in edits:
        struct.pack_into("<" + fmt, data, pos, value)
    out = tmp / "hostile.gguf"
    out.write_bytes(bytes(data))
    return out


def read_u64(path: Path, pos: int) -> int:
    return struct.unpack_from("<Q", path.read_bytes(), pos)[0]


Q_NAME = "blk.0.attn_q.weight"  # Q4_1 in the tiny file


def test_type_changed_to_f32(good_gguf, tmp_path):
    assert TYPES["q"] == Q.Q4_1
    _, kind, _, _ = tensor_info(good_gguf, Q_NAME)
    bad = patched(good_gguf, tmp_path, [(kind, "I", int(Q.F32))])
    assert_refused(bad, tmp_path / "out", str(bad), Q_NAME, "overlap")


@pytest.mark.parametrize("delta,words", [(1, ["not a multiple of the alignment (32 bytes)"]), (32, ["overlap"])])
def test_data_offset_moved(good_gguf, tmp_path, delta, words):
    _, _, off, _ = tensor_info(good_gguf, Q_NAME)
    bad = patched(good_gguf, tmp_path, [(off, "Q", read_u64(good_gguf, off) + delta)])
    assert_refused(bad, tmp_path / "out", str(bad), Q_NAME, *words)


@pytest.mark.parametrize("offset", [2**64 - 1, 2**64 - 32, 2**40])
def test_data_offset_beyond_the_file(good_gguf, tmp_path, offset):
    _, _, off, _ = tensor_info(good_gguf, Q_NAME)
    bad = patched(good_gguf, tmp_path, [(off, "Q", offset)])
    assert_refused(bad, tmp_path / "out", str(bad), Q_NAME, "but the file has")


def test_row_not_a_multiple_of_the_block(good_gguf, tmp_path):
    dims, _, _, _ = tensor_info(good_gguf, "token_embd.weight")  # Q8_0: blocks of 32 values
    bad = patched(good_gguf, tmp_path, [(dims, "Q", DIM - 16)])
    assert_refused(bad, tmp_path / "out", "'token_embd.weight'", "not a multiple of Q8_0's block of 32")


def test_unknown_tensor_type(good_gguf, tmp_path):
    _, kind, _, _ = tensor_info(good_gguf, Q_NAME)
    bad = patched(good_gguf, tmp_path, [(kind, "I", 9999)])
    assert_refused(bad, tmp_path / "out", Q_NAME, "unknown type id 9999")


def bounded_cli(*args: object, timeout: float = 120) -> str:
    """`llmflash ARGS` in a child limited to 6 GiB of address space (a regression then fails
    without taking the machine's memory); asserts exit 2 and one stderr line, returns it."""
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30)); "
        "from llmflash.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmflash: error: "), lines
    return lines[0]


def test_metadata_array_longer_than_the_file(good_gguf, tmp_path):
    """An int32 array claiming 2^62 items made gguf's reader loop (growing lists) for ever."""
    f = gguf.GGUFReader(good_gguf).fields["tokenizer.ggml.token_type"]
    count = f.offset + 8 + len(b"tokenizer.ggml.token_type") + 4 + 4
    bad = patched(good_gguf, tmp_path, [(count, "Q", 2**62)])
    line = bounded_cli("convert", bad, tmp_path / "out", timeout=60)
    assert str(bad) in line and "'tokenizer.ggml.token_type' claims 4611686018427387904 items" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weight(tmp_path, value):
    src = tmp_path / "nan.gguf"
    norm = np.ones(DIM, np.float32)
    norm[7] = value
    write_tiny_gguf(src, override={"blk.1.ffn_norm.weight": (norm, Q.F32)})
    assert_refused(src, tmp_path / "out", str(src), "'blk.1.ffn_norm.weight'", "non-finite")


def test_non_finite_block_scale(good_gguf, tmp_path):
    """A Q8_0 block whose float16 scale is infinity dequantizes to inf/NaN."""
    _, _, _, start = tensor_info(good_gguf, "blk.0.ffn_gate.weight")
    bad = patched(good_gguf, tmp_path, [(start, "H", 0x7C00)])
    assert_refused(bad, tmp_path / "out", "'blk.0.ffn_gate.weight'", "non-finite")


def test_float16_overflow(tmp_path):
    src = tmp_path / "big.gguf"
    norm = np.ones(DIM, np.float32)
    norm[0] = 1e6
    write_tiny_gguf(src, override={"output_norm.weight": (norm, Q.F32)})
    assert_refused(src, tmp_path / "out", "'output_norm.weight'", "bfloat16", dtype="float16")
    convert(src, tmp_path / "ok", dtype="float32")
    convert(src, tmp_path / "q", dtype="auto")  # the GGUF's q4/q8 FFN: norms stay float32 there


@pytest.mark.parametrize(
    "key,value",
    [
        ("llama.block_count", 4097),
        ("llama.embedding_length", 2**20),
        ("llama.feed_forward_length", 2**24),
        ("llama.attention.head_count", 2**20),
    ],
)
def test_gguf_counts_bounded(tmp_path, key, value):
    src = tmp_path / "big.gguf"
    w = gguf.GGUFWriter(src, "llama")
    defaults = {
        "llama.block_count": 2,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.attention.head_count": 4,
    }
    for k, v in (defaults | {key: value}).items():
        w.add_uint32(k, v)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_refused(src, tmp_path / "out", str(src), repr(key), "is not an integer in [1, ")


# -- Hugging Face: counts and tensors the config does not account for ---------------------------------


@pytest.fixture(scope="module")
def llama4(tmp_path_factory) -> Path:
    return build_hf("llama", tmp_path_factory.mktemp("llama4"), num_hidden_layers=4).path


def hf_copy(src: Path, tmp: Path, **config) -> Path:
    dst = tmp / "src"
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(config)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_fewer_layers_in_config_than_checkpoint(llama4, tmp_path):
    src = hf_copy(llama4, tmp_path, num_hidden_layers=2)
    assert_refused(
        src,
        tmp_path / "out",
        str(src / "config.json"),
        "model.layers.2.",
        "num_hidden_layers = 2 but the checkpoint has 4 layers",
    )


def test_tensor_of_another_variant(hf_llama, tmp_path):
    src = hf_copy(hf_llama.path, tmp_path)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.self_attn.q_norm.weight"] = t["model.norm.weight"].clone()
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert_refused(src, tmp_path / "out", "config.json", "'model.layers.0.self_attn.q_norm.weight'")


def test_ignorable_tensors_still_convert(hf_llama, tmp_path, convert_to):
    """RoPE buffers of old checkpoints are not weights: they convert as before."""
    src = hf_copy(hf_llama.path, tmp_path)
    t = load_file(str(src / "model.safetensors"))
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = t["model.norm.weight"][:8].clone()
    save_file(t, str(src / "model.safetensors"), metadata={"format": "pt"})
    assert (convert_to(src) / "manifest.json").is_file()


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_hidden_layers", 4097),
        ("hidden_size", 2**24),
        ("intermediate_size", 2**24),
        ("num_attention_heads", 2**20),
        ("vocab_size", 2**24),
    ],
)
def test_hf_counts_bounded(hf_llama, tmp_path, key, value):
    src = hf_copy(hf_llama.path, tmp_path, **{key: value})
    t0 = time.perf_counter()
    assert_refused(src, tmp_path / "out", str(src / "config.json"), f"{key} = {value}", "is not an integer in [1, ")
    assert time.perf_counter() - t0 < 10


def test_hf_huge_layer_count_in_a_bounded_process(hf_llama, tmp_path):
    """The campaign's case as a user meets it: a plan of 2^24 layers used to grow into a
    MemoryError traceback; now exit 2 at once, naming config.json and the key."""
    src = hf_copy(hf_llama.path, tmp_path, num_hidden_layers=2**24)
    line = bounded_cli("convert", src, tmp_path / "out")
    assert "num_hidden_layers = 16777216" in line and str(src / "config.json") in line


# -- FIFOs, devices and folders where a file is expected -----------------------------------------------


def fifo_at(path: Path) -> Path:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    os.mkfifo(path)
    return path


def refuses_without_blocking(src: Path, dst: Path, culprit: Path, kind: str, **kw) -> None:
    assert_refused(src, dst, str(culprit), f"not a regular file ({kind})", child=True, **kw)


def test_gguf_fifo(tmp_path):
    src = fifo_at(tmp_path / "model.gguf")
    refuses_without_blocking(src, tmp_path / "out", src, "a FIFO")


def test_gguf_device(tmp_path):
    src = tmp_path / "zero.gguf"
    src.symlink_to("/dev/zero")
    refuses_without_blocking(src, tmp_path / "out", src, "a device")


@pytest.mark.parametrize(
    "name", ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
@pytest.mark.parametrize("kind", ["a FIFO", "a folder"])
def test_hf_file_not_regular(hf_llama, tmp_path, name, kind):
    src = hf_copy(hf_llama.path, tmp_path)
    culprit = src / name
    if kind == "a FIFO":
        fifo_at(culprit)
    else:
        culprit.unlink(missing_ok=True)
        culprit.mkdir()
    refuses_without_blocking(src, tmp_path / "out", culprit, kind)


def test_hf_shard_device(hf_llama, tmp_path):
    src = hf_copy(hf_llama.path, tmp_path)
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to("/dev/zero")
    refuses_without_blocking(src, tmp_path / "out", src / "model.safetensors", "a device")


@pytest.mark.parametrize("victim", ["index", "shard"])
def test_sharded_checkpoint_fifo(tmp_path, victim):
    src = build_hf("opt", tmp_path / "sharded", max_shard_size="40KB").path
    index = src / "model.safetensors.index.json"
    culprit = index if victim == "index" else sorted(src.glob("*.safetensors"))[-1]
    fifo_at(culprit)
    refuses_without_blocking(src, tmp_path / "out", culprit, "a FIFO")


@pytest.mark.parametrize("as_folder", [False, True])
def test_tokenizer_option_fifo(hf_opt, tmp_path, as_folder):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    culprit = fifo_at(tok / "tokenizer.json")
    refuses_without_blocking(hf_opt.path, tmp_path / "out", culprit, "a FIFO", tokenizer=tok if as_folder else culprit)


def test_tokenizer_option_regular_file_still_works(hf_opt, tmp_path, convert_to):
    tok = tmp_path / "tokenizer.json"
    tok.write_text(tiny_tokenizer_json())
    assert (convert_to(hf_opt.path, tokenizer=tok) / "tokenizer.json").is_file()
