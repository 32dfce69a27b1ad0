"""A store's chat template renders in a child process under CPU, memory and time limits
(llmflash.chat_template): what jinja2's sandbox cannot bound (string doubling with `~`, width
arguments, nested loops over long strings) ends as a ChatTemplateError naming the file, not as
an exhausted machine or a hang."""

from __future__ import annotations

import time

import pytest

from llmflash import chat_template
from llmflash.chat_template import render_chat, render_here
from llmflash.errors import ChatTemplateError

MESSAGES = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "two\nlines"},
]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ bos_token }}{{ eos_token }}"
)


def test_child_renders_what_the_sandbox_renders_here():
    got = render_chat(CHATML, MESSAGES, bos_token="<s>", eos_token="</s>")
    assert got == render_here(CHATML, MESSAGES, "<s>", "</s>")
    assert got.startswith("<|im_start|>user\nhi<|im_end|>\n") and got.endswith("assistant\n<s></s>")


MEMORY_HOGS = {
    "doubling with ~": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "str.center width": "{{ 'x'.center(10**10) }}",
    "center filter": "{{ 'x'|center(10**10) }}",
}


@pytest.mark.parametrize("name", list(MEMORY_HOGS))
def test_memory_hogs_are_errors(name):
    with pytest.raises(ChatTemplateError, match="chat template") as e:
        render_chat(MEMORY_HOGS[name], MESSAGES, source="s/manifest.json")
    assert e.value.path == "s/manifest.json"


def test_cpu_hog_is_stopped(monkeypatch):
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    hog = "{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
    t0 = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="chat template: rendering stopped") as e:
        render_chat(hog, MESSAGES, source="s/manifest.json")
    assert time.perf_counter() - t0 < 10
    assert e.value.path == "s/manifest.json"


def test_template_errors_still_name_the_file():
    with pytest.raises(ChatTemplateError, match=r"s/manifest\.json: chat template: nope"):
        render_chat("{{ raise_exception('nope') }}", MESSAGES, source="s/manifest.json")
