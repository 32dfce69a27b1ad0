"""The server's pieces that need no server: stop sequences over streamed text (against a
character-by-character reference) and the strict request parsing (each bad request a 400 that
names its field)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmflash.serve.protocol import ChatRequest, CompletionRequest, Reply, RequestError, parse
from llmflash.serve.stops import StopMatcher


def first_stop(text: str, stops: list[str]) -> str:
    """The reference: the text up to the first stop sequence to complete, read one character at a
    time (the earliest end; of two ending together, the longer)."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return text[: end - max(map(len, done))]
    return text


def streamed(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = "".join(m.push(p) for p in pieces) + m.flush()
    return out, m.stopped


alphabet = st.sampled_from("abc ")


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.text(alphabet, max_size=4), max_size=12),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=4), max_size=4),
)
def test_stops_over_pieces_equal_the_reference(pieces, stops):
    text = "".join(pieces)
    out, stopped = streamed(pieces, stops)
    assert out == first_stop(text, stops)
    assert stopped == (out != text or any(s in text for s in stops))
    # the same text in one piece, or one character at a time, gives the same answer
    assert streamed([text], stops)[0] == out == streamed(list(text), stops)[0]


def test_stop_across_pieces_is_held_back_then_dropped():
    m = StopMatcher(["</end>"])
    assert m.push("Paris </") == "Paris "  # "</" may begin the stop: held
    assert m.push("e") == ""
    assert m.push("nd> more") == "" and m.stopped
    assert m.push("after") == "" and m.flush() == ""
    m = StopMatcher(["</end>"])
    assert m.push("a </") == "a " and m.push("b") == "</b" and m.flush() == ""


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body,param,words",
    [
        (b"{bad", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (b'{"messages": [], "temperature": NaN}', None, "NaN is not JSON"),
        (json.dumps({**CHAT, "max_tokens": -1}).encode(), "max_tokens", "greater than or equal to 1"),
        (json.dumps({**CHAT, "max_tokens": "5"}).encode(), "max_tokens", "valid integer"),
        (json.dumps({**CHAT, "max_tokens": True}).encode(), "max_tokens", "valid integer"),
        (json.dumps({**CHAT, "temperature": "hot"}).encode(), "temperature", "valid number"),
        (json.dumps({**CHAT, "temperature": 2.5}).encode(), "temperature", "less than or equal to 2"),
        (json.dumps({**CHAT, "top_p": 1.5}).encode(), "top_p", "less than or equal to 1"),
        (json.dumps({**CHAT, "n": 2}).encode(), "n", "1"),
        (json.dumps({**CHAT, "presence_penalty": 0.5}).encode(), "presence_penalty", "penalties"),
        (json.dumps({**CHAT, "tools": []}).encode(), "tools", "unknown field 'tools'"),
        (json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop", "at most 4"),
        (json.dumps({**CHAT, "stop": [""]}).encode(), "stop", "1 to 256"),
        (json.dumps({"messages": []}).encode(), "messages", "at least 1"),
        (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "messages.0.role", "'user'"),
        (json.dumps({"messages": [{"role": "user"}]}).encode(), "messages.0.content", "required"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), "messages.0.content", ""),
        (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1' + b"0" * 30 + b"}", "seed", ""),
        (b"\xff\xfe", None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, None, "not valid JSON"),
    ],
)
def test_bad_chat_requests_are_400s_naming_the_field(body, param, words):
    with pytest.raises(RequestError) as e:
        parse(ChatRequest, body)
    assert e.value.status == 400 and e.value.param == param
    assert words in e.value.message
    assert e.value.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "prompt,ok",
    [("text", "text"), (["text"], "text"), ([1, 2, 3], [1, 2, 3]), ([[4, 5]], [4, 5]), (["a", "b"], None), ([], None)],
)
def test_completion_prompt_forms(prompt, ok):
    body = json.dumps({"prompt": prompt}).encode()
    if ok is None:
        with pytest.raises(RequestError, match="prompt"):
            parse(CompletionRequest, body)
    else:
        req = parse(CompletionRequest, body)
        assert req.prompt_value() == ok and req.limit() == 16  # OpenAI's default for text completions


def test_chat_request_fields():
    req = parse(
        ChatRequest,
        json.dumps(
            {
                **CHAT,
                "messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in "ab"]}],
                "max_completion_tokens": 7,
                "stop": "x",
                "stream_options": {"include_usage": True},
                "temperature": 0,
                "user": "me",
            }
        ).encode(),
    )
    assert req.messages[0].text() == "ab" and req.limit() == 7 and req.stops() == ["x"] and req.include_usage()
    with pytest.raises(RequestError, match="disagree"):
        parse(ChatRequest, json.dumps({**CHAT, "max_tokens": 3, "max_completion_tokens": 4}).encode()).limit()


def test_reply_bodies_follow_openai():
    r = Reply(chat=True, model="m")
    whole = r.whole("hi", "stop", 3, 1)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert r.chunk(first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    closing = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert r.chunk(None, "length")["choices"][0] == closing
    t = Reply(chat=False, model="m")
    assert t.whole("x", "length", 1, 1)["choices"][0]["text"] == "x" and t.chunk("y")["object"] == "text_completion"
