"""`llmflash serve` under load, bounded to a few seconds of traffic on 127.0.0.1: 8 concurrent
`openai` clients x 4 requests against the embedded SmolLM2 at --memory 0.75x (every neuron
computed, so each answer is the one it gets alone), then a full queue (503), then clients that
leave (their slots freed, their generations stopped), and the server's peak RSS against its
budget plus its fixed overhead."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import openai
import pytest
from serve_helpers import PYTHONPATH, Server, wait_until

import llmflash
import llmflash.api
from llmflash.defaults import ensure_default_store

OPTIONS = {"memory": "0.75x", "sparsity": "all"}
CLIENTS, REQUESTS, MAX_TOKENS = 8, 4, 6
PROMPTS = [
    "What is the capital of France?",
    "Name a large animal.",
    "Say hello in Spanish.",
    "What is two plus two?",
    "Name a primary color.",
    "What do bees make?",
    "Where does the sun rise?",
    "What is frozen water called?",
]
LONG = 2000  # the tokens the full queue's requests ask for: they never get that far

# What the server's process holds before its model: the runtime with everything the server
# imports, and the tokenizer.
FIXED_PROBE = r"""
import sys, torch, tokenizers, numpy, safetensors, uvicorn, starlette, pydantic
import llmflash, llmflash.api, llmflash.strategies.flash, llmflash.serve.app, llmflash.commands.serve
tok = tokenizers.Tokenizer.from_file(sys.argv[1] + '/tokenizer.json')
for line in open('/proc/self/status'):
    if line.startswith('VmHWM'):
        print(int(line.split()[1]) * 1024)
"""


@pytest.fixture(scope="module")
def store() -> str:
    return str(ensure_default_store())


def metric(server: Server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def ask(client: openai.OpenAI, model: str, prompt: str, i: int) -> str:
    """Request i of a client: chat or completion, whole or streamed, in turn."""
    kw = dict(model=model, max_tokens=MAX_TOKENS, temperature=0)
    chat, stream = i % 2 == 0, i % 4 >= 2
    if chat:
        r = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **kw)
        return "".join(c.choices[0].delta.content or "" for c in r) if stream else r.choices[0].message.content
    r = client.completions.create(prompt=prompt, stream=stream, **kw)
    return "".join(c.choices[0].text for c in r) if stream else r.choices[0].text


def test_eight_clients_a_full_queue_and_clients_that_leave(store):
    ref = llmflash.FlashModel.open(store, **OPTIONS)
    want = {(p, chat): ref.generate(p, MAX_TOKENS, chat=chat) for p in PROMPTS for chat in (True, False)}
    budget = ref.ffn.plan.budget
    del ref
    s = Server(store, "--memory", OPTIONS["memory"], "--sparsity", OPTIONS["sparsity"], "--queue", str(CLIENTS - 1))
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=300)
        model = client.models.list().data[0].id

        # 1. every answer complete and correct, whatever the interleaving
        got: dict[tuple[int, int], str] = {}
        errors: list[BaseException] = []

        def run(c: int) -> None:
            try:
                for i in range(REQUESTS):
                    got[c, i] = ask(client, model, PROMPTS[c], i)
            except BaseException as e:  # reported below, with the server's log
                errors.append(e)

        threads = [threading.Thread(target=run, args=(c,)) for c in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not errors, f"{errors[0]!r}\n{s.log()[-3000:]}"
        for (c, i), text in sorted(got.items()):
            assert text == want[PROMPTS[c], i % 2 == 0], (c, i)
        assert len(got) == CLIENTS * REQUESTS
        assert metric(s, "llmflash_requests_refused_total") == 0  # 8 clients fit: 1 generated, 7 waiting

        # 2. a full queue answers 503
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}).encode()
        streamed = json.dumps({"prompt": "Far away", "max_tokens": LONG, "stream": True}).encode()
        before = metric(s, "llmflash_completion_tokens_total")
        socks = [s.raw("/v1/completions", streamed)]  # the one generated streams its answer
        wait_until(lambda: httpx.get(s.url + "/health").json()["running"] == 1, 60, "the first to run")
        socks[0].recv(1)  # its stream has begun
        socks += [s.raw("/v1/completions", streamed if k % 2 else body) for k in range(CLIENTS - 1)]
        wait_until(lambda: httpx.get(s.url + "/health").json()["waiting"] == CLIENTS - 1, 60, "a full queue")
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=model, prompt="hi", max_tokens=2)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        assert metric(s, "llmflash_requests_refused_total") == 1

        # 3. clients that leave free their slots and stop their generation
        for sock in socks:
            sock.close()
        wait_until(lambda: httpx.get(s.url + "/health").json() | {"status": 0} == {
            "status": 0, "model": model, "waiting": 0, "running": 0}, 30, "the slots to free")  # fmt: skip
        # the one generated is cancelled; the waiting ones dropped (or cancelled, if the worker took
        # one before the event loop saw its client leave)
        left = metric(s, "llmflash_requests_dropped_total") + metric(s, 'llmflash_requests_total{outcome="cancelled"}')
        assert left == CLIENTS
        assert metric(s, "llmflash_completion_tokens_total") - before < LONG / 4
        text = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0)
        assert text.choices[0].text == want[PROMPTS[0], False]

        # 4. peak RSS: the fixed overhead, the budget, one request's KV cache, the working buffers
        fixed = int(
            subprocess.run(
                [sys.executable, "-c", FIXED_PROBE, store], capture_output=True, text=True, env=PYTHONPATH, check=True
            ).stdout
        )
        kv = llmflash.FlashModel.open(store).kv_cache_bytes(64 + LONG)
        peak, bound = s.status("VmHWM"), fixed + budget + kv + llmflash.api.WORKING_BYTES
        assert peak <= bound, (
            f"server peak RSS {peak / 1e6:.0f} MB over {bound / 1e6:.0f} MB: fixed {fixed / 1e6:.0f} + budget "
            f"{budget / 1e6:.0f} + KV {kv / 1e6:.0f} + working {llmflash.api.WORKING_BYTES >> 20} MB"
        )
    finally:
        assert s.stop() == 0, s.log()[-3000:]
