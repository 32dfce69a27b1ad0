"""Bad input to the CLI and the API: every case exits with code 2 and one line on stderr naming the
flag or value (no traceback), or raises a clear error of the LlmflashError family that is also a
ValueError. On tiny random-weight stores: a 64-token model with a 128-token tokenizer."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_tokenizer_json
from store_builders import write_store as write_tiny_store

from llmflash.cli import main
from llmflash.errors import ChatTemplateError, InvalidArgumentError, LlmflashError
from llmflash.store import write_manifest

# flash without predictors falls back to the oracle, with a warning (expected here)
pytestmark = pytest.mark.filterwarnings("ignore:.*no predictors:UserWarning")

JOIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def write_store(dst: Path, chat_template: str | None = JOIN) -> Path:
    """A random-weight store whose tokenizer (t0..t127) knows twice the model's 64 tokens."""
    return write_tiny_store(dst, tokenizer=tiny_tokenizer_json(128), chat_template=chat_template)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_store(tmp_path_factory.mktemp("inputs") / "tiny.llmflash")


@pytest.fixture(scope="module")
def model(store):
    import llmflash

    return llmflash.FlashModel.open(store)


def run(argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in process: (exit code, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, *names: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert lines and lines[-1].startswith("llmflash: error: "), err
    assert "Traceback" not in err
    assert len([line for line in lines if line.startswith("llmflash: error")]) == 1
    for name in names:
        assert name in lines[-1], (name, lines[-1])


# -- generate ---------------------------------------------------------------------------------

GENERATE_CASES = [
    (["--temperature", "1", "--top-p", "-1"], ["top_p", "-1"]),
    (["--temperature", "1", "--top-p", "1.5"], ["top_p", "1.5"]),
    (["--temperature", "1", "--top-p", "nan"], ["top_p", "nan"]),
    (["--temperature", "nan"], ["temperature", "nan"]),
    (["--temperature", "inf"], ["temperature", "inf"]),
    (["--temperature", "-1"], ["temperature", "-1"]),
    (["--window", "-1"], ["window", "-1"]),
    (["--window", "99999999999"], ["window", "99999999999"]),
    (["--sparsity", "oracle:5"], ["oracle:5", "KEEP"]),
    (["--sparsity", "oracle:0"], ["oracle:0", "KEEP"]),
    (["--sparsity", "oracle:abc"], ["oracle:abc", "KEEP"]),
    (["--sparsity", "oracle:nan"], ["oracle:nan"]),
    (["--sparsity", "predictor:1.5"], ["predictor:1.5", "RECALL"]),
    (["--sparsity", "predictor:0.9/x"], ["predictor:0.9/x", "STAY"]),
    (["--sparsity", "all:3"], ["all:3"]),
    (["--sparsity", "bogus"], ["bogus"]),
    (["--hot", "nan"], ["hot", "nan"]),
    (["--hot", "-0.5"], ["hot", "-0.5"]),
    (["--memory", "1KB"], ["memory budget 1.0 KB", "KB"]),
    (["--memory", "9" * 400 + "MB"], ["memory budget", "too large"]),
    (["--seed", str(1 << 70)], ["seed", str(1 << 70)]),
    (["-n", "-1"], ["max_new_tokens", "-1"]),
    (["--chat", "-p", "t100 t2"], ["token id 100", "[0, 64)"]),  # tokenizer knows more than the model
    (["-p", "t100 t2"], ["token id 100", "[0, 64)"]),
    (["-p", ""], ["empty prompt"]),
]


@pytest.mark.parametrize("extra,names", GENERATE_CASES, ids=[" ".join(c[0])[:40] for c in GENERATE_CASES])
def test_generate_bad_input(store, capsys, extra, names):
    argv = ["generate", str(store), "-p", "t1 t2", "-n", "2", *extra]
    rc, err = run(argv, capsys)
    assert_one_line_error(rc, err, *names)
    assert "0.0 MB" not in err


def test_top_p_zero_keeps_the_top_token(store, capsys, model):
    assert (
        main(["generate", str(store), "-p", "t1 t2", "-n", "3", "--temperature", "1", "--top-p", "0", "--seed", "3"])
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert out == model.generate("t1 t2", max_new_tokens=3, stop_at_eos=True)  # = greedy


def test_window_zero_is_still_valid(store, capsys):
    with pytest.warns(UserWarning, match="oracle"):
        assert main(["generate", str(store), "-p", "t1 t2", "-n", "2", "--window", "0"]) == 0


# -- chat templates -----------------------------------------------------------------------------

TEMPLATES = {
    "syntax": ("{% for %}", "does not parse"),
    "undefined": ("{{ messages[5].content }}", "UndefinedError"),
    "unsafe": ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    "raises": ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
    "empty": ("{{ messages.__class__ }}", "empty prompt"),
    "nested range": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "range()"),
    "repeat": ("{{ 'x' * 10**10 }}", "repetition"),
    "doubling": (
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "concatenation",
    ),
    "power": ("{{ 2 ** 10000000 }}", "power"),
    "recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.fixture(scope="module")
def template_stores(tmp_path_factory) -> dict[str, Path]:
    import shutil

    base = write_store(tmp_path_factory.mktemp("tmpl") / "base.llmflash")
    out = {}
    for name, (template, _) in TEMPLATES.items():
        dst = base.parent / f"{name.replace(' ', '_')}.llmflash"
        shutil.copytree(base, dst)
        m = json.loads((dst / "manifest.json").read_text())
        m["chat_template"] = template
        write_manifest(dst, m)  # with its new checksum
        out[name] = dst
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_bad_chat_template(template_stores, capsys, name):
    store = template_stores[name]
    t0 = time.perf_counter()
    rc, err = run(["generate", str(store), "-p", "t1 t2", "-n", "2", "--chat"], capsys)
    assert time.perf_counter() - t0 < 20
    assert_one_line_error(rc, err, str(store / "manifest.json"), "chat template", TEMPLATES[name][1])


def test_chat_template_errors_are_llmflash_errors():
    from llmflash.generation import render_chat

    for template, what in TEMPLATES.values():
        if what == "empty prompt":
            continue  # renders fine (to nothing): the API checks that
        with pytest.raises(ChatTemplateError, match="chat template") as e:
            render_chat(template, [{"role": "user", "content": "hi"}], source="x/manifest.json")
        assert isinstance(e.value, LlmflashError) and isinstance(e.value, ValueError)
        assert e.value.path == "x/manifest.json"


# -- bench, calibrate, eval -------------------------------------------------------------------

BENCH_CASES = [
    (["--strategies", "foo"], ["foo", "naive", "flash-serial", "ablation"]),
    (["--strategies", "naive,,"], []),  # empty entries are ignored: runs (checked below)
    (["--strategies", ","], ["none given"]),
    (["--tokens", "0"], ["tokens", "0"]),
    (["--tokens", "-3"], ["tokens", "-3"]),
    (["--window", "-1"], ["window", "-1"]),
    (["--window", "99999999999"], ["window"]),
    (["--sparsity", "oracle:5"], ["oracle:5"]),
]


@pytest.mark.parametrize("extra,names", BENCH_CASES, ids=[" ".join(c[0]) for c in BENCH_CASES])
def test_bench_bad_input(store, capsys, extra, names):
    argv = ["bench", str(store), "--memory", "2x", "--tokens", "2", *extra]
    if not names:
        assert main(argv) == 0
        return
    assert_one_line_error(*run(argv, capsys), *names)


@pytest.mark.parametrize("command", ["calibrate", "eval"])
@pytest.mark.parametrize("threads", ["-1", "0"])
def test_threads_must_be_positive(store, capsys, command, threads):
    assert_one_line_error(*run([command, str(store), "--threads", threads], capsys), "threads", threads)


def test_eval_window_and_memory(store, capsys):
    assert_one_line_error(*run(["eval", str(store), "--window", "-1", "--sparsity", "oracle"], capsys), "window")
    assert_one_line_error(*run(["eval", str(store), "--memory", "lots", "--sparsity", "oracle"], capsys), "lots")


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"t{rng.randrange(2, 64)}" for _ in range(n))


def test_calibrate_records_the_rank_it_trained(tmp_path, capsys):
    store = write_store(tmp_path / "s.llmflash")
    text = tmp_path / "calib.txt"
    text.write_text(words(400, 0))
    assert (
        main(
            [
                "calibrate",
                str(store),
                "--text",
                str(text),
                "--tokens",
                "300",
                "--rank",
                "1000",
                "--epochs",
                "1",
                "--chunk",
                "100",
                "--batch",
                "64",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    entry = json.loads((store / "manifest.json").read_text())["predictors"]
    assert entry["rank"] == 32  # the model's width, not the 1000 asked for
    assert "rank 32" in err and "--rank 1000" in err
    from llmflash.sparsity.predictors_file import load_predictors

    p = load_predictors(store)
    assert p.meta["rank"] == 32 and all(layer.rank == 32 for layer in p.layers)


# -- API --------------------------------------------------------------------------------------


def test_api_errors_are_llmflash_value_errors(store, model):
    import llmflash

    cases = [
        lambda: llmflash.FlashModel.open(store, sparsity="bogus"),
        lambda: llmflash.FlashModel.open(store, strategy="turbo"),
        lambda: llmflash.FlashModel.open(store, strategy="dense", window=4),
        lambda: llmflash.FlashModel.open(store, window=-1),
        lambda: llmflash.FlashModel.open(store, sparsity="oracle:5"),
        lambda: model.generate(""),
        lambda: model.generate([]),
        lambda: model.generate("t1", temperature=math.nan),
        lambda: model.generate("t1", top_p=-1.0, temperature=1.0),
        lambda: model.generate("t100 t2", chat=True),
        lambda: model.logits([model.config.vocab_size]),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(LlmflashError) as e:
            case()
        assert isinstance(e.value, ValueError), i


def test_generate_checks_before_streaming(model):
    # stream=True: the arguments are checked when generate is called, not at the first piece
    with pytest.raises(InvalidArgumentError, match="temperature"):
        model.generate("t1", stream=True, temperature=math.nan)
    with pytest.raises(InvalidArgumentError, match="token id 100"):
        model.generate_ids("t100", chat=True)


def test_sample_top_p_zero_is_the_top_token():
    from llmflash.generation import sample

    logits = torch.tensor([1.0, 3.0, 2.9, 0.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample(logits, 1.0, 0.0, gen) for _ in range(30)} == {1}
    assert sample(logits, 1e-40, 0.9, gen) == 1  # logits / temperature overflows: greedy


def test_oracle_keep_is_checked(store):
    from llmflash.sparsity import Oracle
    from llmflash.store import Store

    for keep in (0.0, 5.0, math.nan, -1.0):
        with pytest.raises(InvalidArgumentError, match="keep"):
            Oracle(Store(store), keep=keep)


def test_budget_message_has_meaningful_units():
    from llmflash.budget import format_bytes, plan_caches
    from llmflash.errors import BudgetError

    with pytest.raises(BudgetError) as e:
        plan_caches(900, 53_248, [48, 40], 384, scratch_neurons=0)
    msg = str(e.value)
    assert "900 B" in msg and "53.2 KB" in msg and "use at least 53.3 KB" in msg and "0.0 MB" not in msg
    assert [format_bytes(n) for n in (5, 1500, 2_500_000, 7_000_000_000)] == ["5 B", "1.5 KB", "2.5 MB", "7.0 GB"]
    assert format_bytes(1049, up=True) == "1.1 KB"  # "use at least" never rounds below the need


# -- the CLI's own net ------------------------------------------------------------------------


def test_llmflash_errors_exit_2_on_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    import llmflash.commands.convert as convert_command
    from llmflash.errors import StoreError

    def store_error(args):
        raise StoreError("first line\nsecond line", "x/manifest.json")

    monkeypatch.setattr(convert_command, "run", store_error)
    rc, err = run(["convert", "a", "b"], capsys)
    assert_one_line_error(rc, err, "x/manifest.json: first line second line")

    def bug(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(convert_command, "run", bug)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["convert", "a", "b"])
