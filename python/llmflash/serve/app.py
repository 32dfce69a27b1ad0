"""The HTTP side: Starlette routes for OpenAI's chat and text completions, the model list, health
and metrics; the request body limit; and the error handlers that turn every refusal into
OpenAI's error JSON with its HTTP status (400 bad request, 404 unknown model or route, 413 body
or prompt too large, 503 queue full, 504 past the time limit), never a traceback.

A request is read, checked, tokenized (a worker thread: the chat template renders in a child
process) and only then queued, so a bad one never takes a slot. While it waits and while it is
generated, the handler also watches its connection: a client that goes away cancels its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..api import FlashModel
from ..errors import LlmflashError
from .engine import Engine, Job
from .metrics import Metrics
from .protocol import ChatRequest, CompletionRequest, Reply, RequestError, Sampling, error_body, parse, sse

log = logging.getLogger("llmflash.serve")

DRAIN_BYTES = 64 << 20  # an oversized body is read (and dropped) up to this, so its client sees the 413


@dataclass
class Settings:
    model_name: str
    queue: int = 16  # requests that may wait while one is generated
    max_body: int = 4 << 20  # bytes of one request body
    max_prompt_tokens: int | None = None  # None: the model's context
    max_tokens: int | None = None  # the most tokens one request may ask for; None: the context
    timeout: float = 600.0  # seconds from arrival to the last token
    allow_origins: tuple[str, ...] = ()  # CORS, for chat front ends in a browser


def create_app(model: FlashModel, settings: Settings) -> Starlette:
    metrics = Metrics()
    engine = Engine(model, settings.queue, metrics)
    context = model.config.max_positions
    max_prompt = min(settings.max_prompt_tokens or context, context - 1)
    created = int(time.time())

    async def health(request: Request) -> Response:
        waiting, running = engine.depth()
        return JSONResponse({"status": "ok", "model": settings.model_name, "waiting": waiting, "running": running})

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "llmflash"}

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def one_model(request: Request) -> Response:
        check_model(request.path_params["name"])
        return JSONResponse(model_card())

    async def metrics_text(request: Request) -> Response:
        waiting, running = engine.depth()
        return PlainTextResponse(metrics.prometheus(waiting, running, model.strategy), media_type="text/plain")

    def check_model(name: str | None) -> None:
        if name is not None and name != settings.model_name:
            raise RequestError(
                f"the model {name!r} does not exist: this server serves {settings.model_name!r}",
                404,
                param="model",
                code="model_not_found",
            )

    def tokenize(req: Sampling) -> list[int]:
        """The prompt's token ids (in a worker thread: a chat template renders in a child process)."""
        try:
            if isinstance(req, ChatRequest):
                messages = [{"role": m.role, "content": m.text()} for m in req.messages]
                return model.prompt_ids(model.chat_ids(messages))
            assert isinstance(req, CompletionRequest)
            return model.prompt_ids(req.prompt_value())
        except (LlmflashError, ValueError, TypeError) as e:  # an empty prompt, an id out of range, a
            # template error, text the tokenizer refuses (a lone UTF-16 surrogate)
            param = "messages" if isinstance(req, ChatRequest) else "prompt"
            raise RequestError(str(e), param=param) from None

    async def prepare(request: Request, kind: type[Sampling]) -> tuple[Any, list[int], int]:
        body = await read_body(request, settings.max_body)
        req = await run_in_threadpool(parse, kind, body)  # up to --max-body of JSON: off the event loop
        check_model(req.model)
        ids = await run_in_threadpool(tokenize, req)
        if len(ids) > max_prompt:
            raise RequestError(
                f"the prompt is {len(ids)} tokens, over this server's limit of {max_prompt} "
                f"(the model's context is {context} positions)",
                413,
                param="messages" if kind is ChatRequest else "prompt",
                code="context_length_exceeded",
            )
        asked = req.limit()
        if asked is not None and settings.max_tokens is not None and asked > settings.max_tokens:
            raise RequestError(
                f"max_tokens {asked} is over this server's limit of {settings.max_tokens}", param="max_tokens"
            )
        room = context - len(ids)  # a generation ends with finish_reason "length" at the context's end
        return req, ids, min(asked or settings.max_tokens or room, room)

    async def complete(request: Request, kind: type[Sampling]) -> Response:
        chat = kind is ChatRequest
        req, ids, max_tokens = await prepare(request, kind)
        loop = asyncio.get_running_loop()
        job = Job(
            "chat" if chat else "completion",
            ids,
            max_tokens,
            req.temperature,
            req.top_p,
            req.seed,
            req.stops(),
            settings.timeout,
            loop,
        )
        engine.submit(job)
        reply = Reply(chat, settings.model_name)
        watch = Watch(request, job)
        streaming = False
        try:
            first = await watch.next()  # the queue's wait: a failure before any text keeps its status
            if first is None:
                return Response(status_code=499)  # the client has gone; nobody reads this
            if first[0] == "error":
                raise first[1]
            if req.stream:
                watch.close()  # from here on, the streaming response watches the connection
                streaming = True
                return JobStream(job, stream(job, reply, first, req.include_usage()))
            pieces, event = [], first
            while event[0] == "text":
                pieces.append(event[1])
                event = await watch.next()
                if event is None:
                    return Response(status_code=499)
            if event[0] == "error":
                raise event[1]
            return JSONResponse(reply.whole("".join(pieces), event[1], len(ids), job.completion_tokens))
        finally:
            watch.close()
            if not streaming:
                job.cancel()  # harmless once it has ended; stops it if this handler was cancelled

    async def chat_completions(request: Request) -> Response:
        return await complete(request, ChatRequest)

    async def completions(request: Request) -> Response:
        return await complete(request, CompletionRequest)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]
    middleware = []
    if settings.allow_origins:
        middleware.append(
            Middleware(
                CORSMiddleware, allow_origins=list(settings.allow_origins), allow_methods=["*"], allow_headers=["*"]
            )
        )
    app = Starlette(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={RequestError: on_request_error, HTTPException: on_http_error, Exception: on_crash},
    )
    app.state.engine, app.state.metrics = engine, metrics
    return app


class Watch:
    """A job's events, read while watching its connection: a client that goes away cancels it."""

    def __init__(self, request: Request, job: Job):
        self.job = job
        self.gone: asyncio.Task | None = asyncio.ensure_future(disconnected(request))

    async def next(self) -> tuple | None:
        """The job's next event, or None (the job cancelled) when the client has gone first."""
        assert self.gone is not None
        get = asyncio.ensure_future(self.job.events.get())
        done, _ = await asyncio.wait({get, self.gone}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        self.job.cancel()
        return None

    def close(self) -> None:
        if self.gone is not None:
            self.gone.cancel()
            self.gone = None


async def disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class JobStream(StreamingResponse):
    """A streamed completion as Server-Sent Events; however the response ends (done, the client
    gone, the server shutting down, even before the first event was sent), its job is cancelled."""

    def __init__(self, job: Job, events: AsyncIterator[bytes]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()


async def stream(job: Job, reply: Reply, first: tuple, include_usage: bool) -> AsyncIterator[bytes]:
    """The Server-Sent Events of a streamed completion, ending with `data: [DONE]`. Starlette
    cancels this when the client goes away, and the job is cancelled with it."""
    try:
        event = first
        if reply.chat:
            yield sse(reply.chunk(first=True))
        while True:
            if event[0] == "text":
                yield sse(reply.chunk(event[1]))
            elif event[0] == "end":
                yield sse(reply.chunk(None, event[1]))
                if include_usage:
                    yield sse(reply.usage_chunk(len(job.ids), job.completion_tokens))
                break
            else:  # an error after the response began: OpenAI's error object as the last event
                yield sse(event[1].body())
                break
            event = await job.events.get()
        yield sse("[DONE]")
    finally:
        job.cancel()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes; a 413 RequestError past that (read from the ASGI
    messages directly, so that the rest of a refused body can still be drained)."""

    def too_large(size: str) -> RequestError:
        return RequestError(f"the request body is {size}, over this server's {limit} byte limit", 413)

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await drain(request)
        raise too_large(f"{int(declared)} bytes")
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] != "http.request":
            raise RequestError("the client went away while sending its request", 400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            await drain(request)
            raise too_large("longer")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def drain(request: Request) -> None:
    """Read and drop the rest of a refused body (up to DRAIN_BYTES), so that the client, still
    sending, is not cut off before it reads the 413."""
    seen = 0
    while seen <= DRAIN_BYTES:
        message = await request.receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        seen += len(message.get("body", b""))


async def on_request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = "no such route" if exc.status_code == 404 else exc.detail
    body = error_body(f"{request.method} {request.url.path}: {what}", "invalid_request_error", code=None)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def on_crash(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(error_body("internal server error", "server_error"), status_code=500)
