"""Runtime holes a hostile-input campaign found: non-finite outputs, threads sharing a model,
absurd thread counts, FIFOs and huge files as evaluation text, argparse usage errors. Each is an
LlmflashError in the API and one stderr line with exit code 2 on the command line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_json
from safetensors.torch import load_file, save_file
from store_builders import reseal, tiny_config, write_store

import llmflash
from llmflash import cli
from llmflash.errors import InvalidArgumentError, StoreError
from llmflash.textfile import read_text_for_tokens
from llmflash.threads import max_threads

PYTHONPATH = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "python")}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("llmflash: error: ") and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def tok_store(tmp_path_factory) -> Path:
    """A random-weight Llama-shaped store with a word-level tokenizer (t0 .. t63)."""
    return write_store(tmp_path_factory.mktemp("tok") / "s.llmflash", tokenizer=tiny_tokenizer_json(64))


# -- non-finite logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [3e38, -1e30])
def test_non_finite_logits_are_an_error_not_a_token(tok_store, tmp_path, value, capsys):
    """Weights whose activations overflow (finite, so they pass the load-time checks, and consistent
    with the store's checksums: written that way) gave NaN logits, hence token 0 forever with exit 0;
    now the forward pass is a StoreError naming the store."""
    dst = tmp_path / "bad.llmflash"
    import shutil

    shutil.copytree(tok_store, dst)
    t = load_file(dst / "resident.safetensors")
    t["layers.1.ffn_norm.weight"][:] = value  # the FFN's products overflow to Inf
    save_file(t, dst / "resident.safetensors", metadata={"format": "llmflash-store"})
    reseal(dst)
    for strategy in ("dense", "naive"):
        model = llmflash.FlashModel.open(dst, strategy=strategy)
        with pytest.raises(StoreError, match="non-finite logits") as e:
            model.logits([2, 3, 4])
        assert e.value.path == str(dst)
        with pytest.raises(StoreError, match="non-finite logits"):
            list(model.generate_ids([2, 3], max_new_tokens=4))
    assert cli.main(["generate", str(dst), "-p", "t3 t4", "-n", "4"]) == 2
    assert str(dst) in one_line_error(capsys)


def test_finite_model_passes_the_check(tok_store):
    model = llmflash.FlashModel.open(tok_store)
    assert torch.isfinite(model.logits([2, 3, 4])).all()


# -- threads sharing one model -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "strategy,options", [("naive", {}), ("dense", {}), ("flash", {"memory": "0.9x", "sparsity": "all"})]
)
def test_threads_sharing_a_model_get_their_own_tokens(tok_store, strategy, options):
    """naive used to change tokens silently when two threads shared a model (one read buffer),
    and flash raised `RuntimeError: Already borrowed`. Now forward passes take turns: every
    thread gets the tokens its prompt gets alone (flash with every neuron wanted is exact)."""
    model = llmflash.FlashModel.open(tok_store, strategy=strategy, **options)
    prompts = [[2 + i, 7 + i, 11 + 2 * i] for i in range(4)]
    alone = [list(model.generate_ids(p, max_new_tokens=12, stop_at_eos=False)) for p in prompts]
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(prompts))

    def run(i: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                got[i] = list(model.generate_ids(prompts[i], max_new_tokens=12, stop_at_eos=False))
                assert got[i] == alone[i]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    assert [got[i] for i in range(len(prompts))] == alone


# -- thread counts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["calibrate", "eval"])
@pytest.mark.parametrize("threads", ["100000", "30000", "0"])
def test_absurd_thread_counts_are_refused(command, threads, tmp_path, capsys):
    """--threads 100000 segfaulted in libgomp (30000 aborted): now an error before any work."""
    assert cli.main([command, str(tmp_path / "no-store"), "--threads", threads]) == 2
    err = one_line_error(capsys)
    assert f"[1, {max_threads()}]" in err and threads in err


def test_thread_bound_in_the_api(tok_store):
    from llmflash.commands.calibrate import calibrate
    from llmflash.commands.evaluation import evaluate

    with pytest.raises(InvalidArgumentError, match="threads"):
        calibrate(tok_store, threads=max_threads() + 1)
    with pytest.raises(InvalidArgumentError, match="threads"):
        evaluate(tok_store, threads=10**5)


# -- evaluation text ---------------------------------------------------------------------------------
def test_eval_text_fifo_is_refused_at_once(tok_store, tmp_path):
    """`eval --text FIFO` hung; now it is refused before anything is opened (a subprocess with a
    timeout, so a regression fails instead of hanging the suite)."""
    fifo = tmp_path / "text.fifo"
    os.mkfifo(fifo)
    out = subprocess.run(
        [sys.executable, "-m", "llmflash.cli", "eval", str(tok_store), "--text", str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        env=PYTHONPATH,
    )
    assert out.returncode == 2 and "regular file" in out.stderr and str(fifo) in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("command", ["eval", "calibrate"])
@pytest.mark.parametrize("path", ["/dev/zero", "/"])
def test_text_device_or_folder_is_refused(tok_store, command, path, capsys):
    """/dev/zero as `--text` drove the machine out of memory."""
    assert cli.main([command, str(tok_store), "--text", path]) == 2
    assert "regular file" in one_line_error(capsys)


def test_eval_text_reads_only_what_the_tokens_need(tmp_path):
    """`eval --text` read the whole file before tokenizing: a 64 MB file is now read only as far
    as the tokens asked for (the test counts the bytes read through the file object)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tiny_tokenizer_json(64))
    big = tmp_path / "big.txt"
    line = " ".join(f"t{i}" for i in range(64)) + "\n"
    with open(big, "w") as f:
        for _ in range((64 << 20) // len(line)):
            f.write(line)
    text = read_text_for_tokens(big, tok, 1000)
    assert len(tok.encode(text).ids) > 1000
    assert len(text) < 1 << 20  # under 1 MB of a 64 MB file
    assert text == big.read_text()[: len(text)]  # its start, as it is
    small = tmp_path / "small.txt"
    small.write_bytes(b"t1 t2 \xff t3")  # bad UTF-8 is replaced, not an error
    assert read_text_for_tokens(small, tok, 1000) == "t1 t2 \ufffd t3"


# -- usage errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv,words",
    [
        ([], "required: command"),
        (["convert"], "convert: the following arguments are required: src, dst"),
        (["generate", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "-n", "many"], "invalid int value"),
        (["eval", "--tokens", "x"], "eval: argument --tokens"),
        (["bench", "--strategies"], "bench: argument --strategies"),
        (["calibrate", "--kind", "magic"], "calibrate: argument --kind"),
        (["profile-disk", "--nope"], "profile-disk: unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line(argv, words, capsys):
    """argparse printed its usage block and an error (7 lines); the README promises one line."""
    assert cli.main(argv) == 2
    err = one_line_error(capsys)
    assert words in err and "--help" in err


def test_help_still_prints_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--help"])
    assert e.value.code == 0 and "usage: llmflash convert" in capsys.readouterr().out


def test_tiny_config_is_what_the_store_holds(tok_store):
    """The fixtures above rely on the tokenizer's ids fitting the model."""
    assert llmflash.FlashModel.open(tok_store).config.vocab_size == tiny_config().vocab_size == 64


# -- calibrate's writes ------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), "safetensors"])
def test_calibrate_disk_full_is_one_line(tok_store, tmp_path, monkeypatch, capsys, error):
    """calibrate writing predictors.safetensors on a full disk escaped as a SafetensorError
    traceback (exit 1); now a StoreError naming the file, and the store is as it was."""
    import shutil

    import safetensors.torch
    from safetensors import SafetensorError

    dst = shutil.copytree(tok_store, tmp_path / "s.llmflash")
    before = sorted(os.listdir(dst))
    exc = (
        SafetensorError("Error while serializing: IoError(No space left on device)")
        if error == "safetensors"
        else error
    )

    def full(*a, **k):
        raise exc

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert cli.main(["calibrate", str(dst), "--tokens", "64", "--epochs", "1", "--quiet"]) == 2
    err = one_line_error(capsys)
    assert "predictors.safetensors" in err and "No space left" in err
    assert sorted(os.listdir(dst)) == before
    llmflash.FlashModel.open(dst).logits([2, 3])  # still opens, unchanged
