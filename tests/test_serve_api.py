"""`llmflash serve` as a client sees it: a real server process on 127.0.0.1 (the embedded SmolLM2,
flash at 0.75x with every neuron computed, so a request's tokens do not depend on the requests
before it), spoken to with the `openai` client and, for what that client will not send, httpx.
Every answer is checked against FlashModel.generate with the same options in this process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import httpx
import openai
import pytest
from serve_helpers import PYTHONPATH, Server, wait_until

import llmflash
from llmflash.defaults import ensure_default_store

OPTIONS = {"memory": "0.75x", "sparsity": "all"}
ASK = "What is the capital of France?"


@pytest.fixture(scope="module")
def store() -> str:
    return str(ensure_default_store())


@pytest.fixture(scope="module")
def server(store):
    s = Server(store, "--memory", OPTIONS["memory"], "--sparsity", OPTIONS["sparsity"], "--queue", "4")
    yield s
    assert s.stop() == 0, s.log()[-3000:]  # SIGTERM: a clean stop


@pytest.fixture(scope="module")
def reference(store) -> llmflash.FlashModel:
    return llmflash.FlashModel.open(store, **OPTIONS)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def name(client) -> str:
    return client.models.list().data[0].id


def test_models_and_health(server, client, name):
    models = client.models.list().data
    assert [m.id for m in models] == [name] == ["smollm2-135m-instruct-f16"]
    assert client.models.retrieve(name).id == name
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == name


def test_chat_equals_the_api(client, name, reference):
    r = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": ASK}], max_tokens=12, temperature=0
    )
    want_ids = list(reference.generate_ids(ASK, 12, chat=True))
    assert r.choices[0].message.content == reference.generate(ASK, 12, chat=True)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == ("length" if len(want_ids) == 12 else "stop")
    assert r.usage.prompt_tokens == len(reference.chat_prompt(ASK))
    assert r.usage.completion_tokens == len(want_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == name


def test_chat_stream_equals_the_whole_answer(client, name, reference):
    kw = dict(model=name, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}])
    whole = client.chat.completions.create(**kw, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            **kw, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it came in pieces
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    ids = reference.chat_ids([{"role": "system", "content": "Be brief."}, {"role": "user", "content": ASK}])
    assert text == reference.generate(ids, 10)


def test_completions_plain_streamed_and_by_ids(client, name, reference):
    prompt = "The capital of France is"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == reference.generate(prompt, 8)
    assert r.usage.prompt_tokens == len(reference.encode(prompt)) and r.object == "text_completion"
    pieces = client.completions.create(model=name, prompt=prompt, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == r.choices[0].text
    by_ids = client.completions.create(model=name, prompt=reference.encode(prompt), max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == r.choices[0].text


def test_stop_sequences(client, name, reference):
    full = reference.generate(ASK, 16, chat=True)
    stop = full.split()[2]  # a word the answer reaches
    want = full[: full.index(stop)]
    kw = dict(model=name, messages=[{"role": "user", "content": ASK}], max_tokens=16, temperature=0)
    r = client.chat.completions.create(**kw, stop=[stop, "never-said"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(list(reference.generate_ids(ASK, 16, chat=True)))
    chunks = list(client.chat.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_repeats_a_sampled_answer(client, name, reference):
    kw = dict(model=name, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=12, temperature=1.0)
    a = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=7).choices[0].message.content
    assert a == b == reference.generate("Tell me a story.", 12, chat=True, temperature=1.0, seed=7)
    others = {client.chat.completions.create(**kw, seed=s).choices[0].message.content for s in (1, 2, 3)}
    assert others - {a}  # the seed is what repeated it


def error_of(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert "Traceback" not in r.text
    return body["error"]


def test_bad_requests_get_openai_errors(server, name):
    chat = server.url + "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(chat, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in error_of(r)["message"]
    r = httpx.post(chat, json={"messages": msgs, "max_tokens": -5})
    assert r.status_code == 400 and error_of(r)["param"] == "max_tokens"
    r = httpx.post(chat, json={"messages": msgs, "temperature": "warm"})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = httpx.post(chat, json={"messages": msgs, "functions": []})
    assert r.status_code == 400 and "unknown field 'functions'" in error_of(r)["message"]
    r = httpx.post(chat, json={"messages": msgs, "model": "gpt-4o"})
    e = error_of(r)
    assert r.status_code == 404 and e["code"] == "model_not_found" and "gpt-4o" in e["message"]
    r = httpx.post(chat, content=b"x" * (10 << 20), timeout=60)  # 10 MB
    assert r.status_code == 413 and "byte limit" in error_of(r)["message"]
    long = "hello " * 9000  # over SmolLM2's 8,192 positions
    r = httpx.post(chat, json={"messages": [{"role": "user", "content": long}]}, timeout=60)
    e = error_of(r)
    assert r.status_code == 413 and e["code"] == "context_length_exceeded" and "8192" in e["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [10**9]})
    assert r.status_code == 400 and "out of range" in error_of(r)["message"]
    half = json.dumps({"messages": [{"role": "user", "content": "half an emoji: \ud83d"}]})  # valid JSON
    r = httpx.post(chat, content=half)
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": ""})
    assert r.status_code == 400 and "empty prompt" in error_of(r)["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "no such route" in error_of(r)["message"]
    r = httpx.get(chat)
    assert r.status_code == 405 and error_of(r)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # none of it hurt the server


def test_log_line_and_metrics_per_request(server, client, name, reference):
    prompt = "One, two, three, four,"
    client.completions.create(model=name, prompt=prompt, max_tokens=4, temperature=0)
    said = f"completion length: prompt={len(reference.encode(prompt))} completion=4 "
    wait_until(lambda: said in server.log(), 10, "the log line")
    line = [ln for ln in server.lines if said in ln][-1]
    assert re.search(r"decode=[0-9.]+tok/s read=[0-9.]+MB hit=[01]\.\d\d$", line), line
    text = httpx.get(server.url + "/metrics").text
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if not ln.startswith("#")}
    assert values["llmflash_completion_tokens_total"] >= 4 and values["llmflash_flash_bytes_read_total"] > 0
    assert values["llmflash_flash_cache_hits_total"] > 0 and values["llmflash_process_resident_bytes"] > 1e8
    assert values['llmflash_requests_total{outcome="length"}'] >= 1


def test_timeout_and_a_full_queue(store, reference):
    """A request past --timeout ends with a 504; with --queue 0 a second request while one is
    generated is a 503 that says why."""
    counting = "1, 2, 3, 4, 5, 6, 7, 8,"
    assert len(list(reference.generate_ids(counting, 100))) == 100  # greedy, it runs past 3 s
    s = Server(store, "--timeout", "3", "--queue", "0", "--strategy", "dense")
    try:
        chat = s.url + "/v1/chat/completions"
        body = json.dumps({"prompt": counting, "max_tokens": 4000, "temperature": 0})
        sock = s.raw("/v1/completions", body.encode())  # takes the one slot
        wait_until(lambda: httpx.get(s.url + "/health").json()["running"] == 1, 30, "the first request to run")
        r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}]})
        e = error_of(r)
        assert r.status_code == 503 and e["code"] == "queue_full" and r.headers["retry-after"] == "1"
        reply = sock.makefile("rb").read()  # the first request's answer, when its time is up
        sock.close()
        assert reply.startswith(b"HTTP/1.1 504") and b'"code":"timeout"' in reply
        for _ in range(5):  # one after the other: each finds the slot free once it has its answer
            r = httpx.post(chat, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert s.stop() == 0


def test_cli_refuses_bad_settings(store, tmp_path):
    for args, words in (
        ([str(tmp_path / "missing")], "missing"),
        ([store, "--queue", "-1"], "--queue"),
        ([store, "--max-body", "lots"], "--max-body"),
        ([store, "--port", "70000"], "--port"),
        ([store, "--memory", "0.75x", "--strategy", "dense"], "flash"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "llmflash", "serve", *args], capture_output=True, text=True, env=PYTHONPATH
        )
        assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_a_busy_port_is_a_clear_error(server, store):
    r = subprocess.run(
        [sys.executable, "-m", "llmflash", "serve", store, "--port", str(server.port), "--strategy", "dense"],
        capture_output=True,
        text=True,
        env=PYTHONPATH,
        timeout=120,
    )
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in r.stderr, r.stderr


def test_ctrl_c_stops_it(store):
    s = Server(store, "--strategy", "dense")
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(30) == 0
