"""The OpenAI wire format the server speaks: the two request bodies (chat and text completions),
checked strictly, and the response, stream-chunk and error bodies.

Requests are validated with pydantic in strict mode: a string where a number belongs, a bool
where an integer belongs, a NaN or an infinity, and any field this server does not know are each
a RequestError (HTTP 400) naming the field. Fields OpenAI defines that change nothing here
(`user`, `n: 1`, zero penalties, `logprobs: false`) are accepted; values this server cannot honour
(`n: 2`, a nonzero penalty, `echo`) are refused rather than ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256


class RequestError(Exception):
    """A request the server refuses, with the HTTP status and the OpenAI error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(1 << 63), le=(1 << 64) - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: Literal[1] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0:
            raise ValueError("this server does not apply penalties: 0 only")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences, not {len(stops)}")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is 1 to {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Literal[False] = False

    def limit(self) -> int | None:
        """The completion's token limit: max_completion_tokens (OpenAI's newer name) or max_tokens."""
        a, b = self.max_completion_tokens, self.max_tokens
        if a is not None and b is not None and a != b:
            raise RequestError("max_tokens and max_completion_tokens disagree: give one", param="max_tokens")
        return a if a is not None else b


class CompletionRequest(Sampling):
    # left to right, ids first: pydantic's default ("smart") tries every branch, and a body of
    # two million ids then took 0.5 GB and half a second to parse instead of 23 MB and 0.03 s
    prompt: Annotated[list[int] | str | list[str] | list[list[int]], Field(union_mode="left_to_right")]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for text completions
    echo: Literal[False] = False
    suffix: None = None
    logprobs: None = None
    best_of: Literal[1] = 1

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)) and len(v) != 1:
            raise ValueError(f"this server completes one prompt per request, not {len(v)}")
        if isinstance(v, list) and not v:
            raise ValueError("empty prompt")
        return v

    def prompt_value(self) -> str | list[int]:
        """The one prompt: text or token ids."""
        p = self.prompt
        return p[0] if isinstance(p, list) and isinstance(p[0], (str, list)) else p  # type: ignore[return-value]

    def limit(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # null: OpenAI's default


def parse(kind: type[Sampling], body: bytes) -> Any:
    """The request in `body` (JSON), validated; a RequestError (400) saying what is wrong."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(body, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RequestError(f"the request body must be a JSON object, not {type(obj).__name__}")
    try:
        return kind.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = ".".join(str(x) for x in err["loc"] if not _type_tag(x)) or None
        if err["type"] == "extra_forbidden":
            raise RequestError(f"unknown field {param!r}: this server does not take it", param=param) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise RequestError(f"{param}: {msg}" if param else msg, param=param) from None


def _type_tag(part: Any) -> bool:
    """pydantic names the branch of a union it tried in an error's location ("str",
    "list[int]", "function-after[...]"); the field's path leaves those out."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or part.endswith("]"))


# -- responses -----------------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Reply:
    """The response bodies of one request: a whole completion, or its stream chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._head("chat.completion" if self.chat else "text_completion")
        body.update(choices=[choice], usage=usage(prompt_tokens, completion_tokens))
        return body

    def chunk(self, text: str | None = None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One stream chunk: a piece of text, or (text None) the closing chunk with its reason."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=None, finish_reason=finish_reason)
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body["choices"] = [choice]
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage is set: no choices, the usage."""
        body = self._head("chat.completion.chunk" if self.chat else "text_completion")
        body.update(choices=[], usage=usage(prompt_tokens, completion_tokens))
        return body


def sse(obj: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event carrying `obj` as JSON (or the literal `[DONE]`)."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()
