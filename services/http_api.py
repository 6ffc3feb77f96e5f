"""The gateway's OpenAI-compatible HTTP API: /v1/chat/completions, /v1/completions, /v1/models, /health.

``HttpServer`` runs uvicorn on the gateway's event loop, beside its gRPC server, on ``http_port``;
the routes call the gateway's own ``Gateway.generate`` (no second gRPC hop), take the same bearer
tokens (``Authorization: Bearer``; a tenant's token acts for its tenant) and the same TLS files
(with ``tls_ca``, clients must present a certificate it signed). ``/health`` needs no token and
answers 503 once the gateway is stopping.

Requests. Chats are rendered with the model's chat template; everything before the last user
message's text is the cacheable context (``workers.prompts``), so each turn reuses the entries of
the turns before it. OpenAI fields: ``model`` (the name ``/v1/models`` lists), ``max_tokens`` (or
``max_completion_tokens``; default: what ``max_positions`` leaves), ``temperature`` (default 1;
0 is greedy), ``top_p``, ``seed`` (0 = unseeded, as over gRPC), ``stop`` (up to 4 strings),
``stream`` with ``stream_options.include_usage``, ``n`` (1 only) and ``user`` (not used). dkv's own
fields (``extra_body`` in the openai client): ``recipe`` (``method``, ``ratio``, ``budget``,
``quant``, ``chunk_size``, ``chunked``, ``params``; without ``method`` they adjust the gateway's
default recipe, chunked LagKV keeping half in int4; with ``method`` they are a recipe of their own), ``selection``, ``budget``, ``budget_fraction``, ``ignore_eos`` and
``tenant``. Any other field is refused, so a misspelt option never goes unnoticed.

Replies carry ``usage`` (``prompt_tokens_details.cached_tokens``: the context tokens the store
already held) and ``dkv``: the request's ``GenerateStats`` (time to first token, bytes read by tier,
...; without ``decode``, the worker's step-by-step detail), in a stream on the event with the finish reason.

Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for bad input (FastAPI's 422
included; a text over ``max_text_bytes``, as over gRPC), 401 without a valid token, 403 for another tenant, 404 for another model, 413 for a
body over 8 MiB, 429 when the decode queue is full, 503 when a worker is unavailable, 504 when a
worker's deadline passed, 502 for other worker failures. A stream has begun only once its first
token is there, so those come with their status; a later failure is one last SSE event of the
same shape, before ``data: [DONE]``. A client that disconnects from a stream ends its generation
on the decode worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import grpc
import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException

from dkv.kvstore.errors import InvalidEntry
from dkv.kvstore.recipe import DEFAULT_RECIPE, Recipe
from dkv.services.gateway import INLINE_TEXT
from dkv.services.pb import gateway_pb2
from dkv.services.server import check_port_free
from dkv.services.transport import (
    MAX_MESSAGE_BYTES,
    Authenticator,
    PermissionDenied,
    allowed_tenant,
    new_request_id,
    request_id,
    tenant_for,
)
from dkv.services.wire import recipe_to_proto
from dkv.workers.prompts import chat_prompt, completion_prompt

log = logging.getLogger("dkv.gateway.http")

HEALTH = "/health"  # open to probes, as gRPC's health service
HOW_TO_AUTHENTICATE = "the header 'Authorization: Bearer <token>' (the openai client's api_key)"
MAX_STOP_STRINGS = 4  # as OpenAI's API
DKV_FIELDS = ("recipe", "selection", "budget", "budget_fraction", "ignore_eos", "tenant")
# worker status -> (HTTP status, OpenAI error type)
WORKER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
FINISH_REASONS = {"stop_token": "stop", "stop_string": "stop", "max_new_tokens": "length"}


class ApiError(Exception):
    """An error reply: HTTP ``status`` and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def api_error(error: Exception) -> ApiError:
    """What a failed generation answers."""
    if isinstance(error, ApiError):
        return error
    if isinstance(error, PermissionDenied):
        return ApiError(403, str(error), "permission_error", "tenant")
    if isinstance(error, (ValueError, InvalidEntry)):
        return ApiError(400, str(error))
    if isinstance(error, grpc.aio.AioRpcError):
        status, kind = WORKER_ERRORS.get(error.code(), (502, "worker_error"))
        return ApiError(
            status, f"a worker answered {error.code().name}: {error.details()}", kind, code=error.code().name.lower()
        )
    log.error("internal error", exc_info=error)
    return ApiError(500, f"internal error: {type(error).__name__}: {error}", "internal_error")


# ------------------------------------------------------------------------------------ requests


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeFields(_Strict):
    """``dkv.kvstore.recipe.Recipe``'s fields. Without ``method`` they adjust the gateway's default
    recipe (the fields left out keep its values); with ``method`` they are a recipe of their own,
    as over gRPC (the fields left out take ``Recipe``'s defaults: no quantization, one entry)."""

    method: str | None = None
    ratio: float | None = None
    budget: int | None = None
    quant: str | None = None
    chunk_size: int | None = None
    chunked: bool | None = None
    params: dict[str, float] | None = None

    def recipe(self) -> Recipe:
        given = self.model_dump(exclude_none=True)
        params = tuple(given.pop("params", {}).items())
        if "method" in given:  # a recipe of its own, as over gRPC
            return Recipe(**given, params=params)
        return dataclasses.replace(DEFAULT_RECIPE, **given, params=params)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    # dkv's own
    recipe: RecipeFields | None = None
    selection: str = "dense"
    budget: int = Field(0, ge=0, lt=1 << 32)
    budget_fraction: float = Field(0.0, ge=0.0, le=1.0)
    ignore_eos: bool = False
    tenant: str = ""

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("dkv answers one choice per request: n must be 1 (send several requests instead)")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    def new_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ends_with_the_user(self) -> ChatRequest:
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be the user's: the assistant answers it")
        return self

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("dkv completes one prompt per request: send a string or one list of token ids")
            return prompt[0]
        return prompt


# ------------------------------------------------------------------------------------ the API


@dataclass
class _Reply:
    """What one request turns into, apart from its text: the names and numbers its replies share."""

    id: str
    created: int
    model: str
    prompt_tokens: int

    def usage(self, stats: gateway_pb2.GenerateStats) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": stats.new_tokens,
            "total_tokens": self.prompt_tokens + stats.new_tokens,
            "prompt_tokens_details": {"cached_tokens": stats.cached_prefix_tokens},
        }


class OpenAIApi:
    """The FastAPI app (``.app``) over a ``services.gateway.Gateway``.

    ``observe(stats)`` records each finished generation (the gateway's metrics); ``serving()``
    says whether ``/health`` answers 200.
    """

    def __init__(
        self,
        gateway,
        settings,
        metrics,
        observe: Callable[[gateway_pb2.GenerateStats], None],
        serving: Callable[[], bool],
    ):
        self.gateway, self.model, self.observe, self.serving = gateway, settings.model, observe, serving
        duration = metrics.histogram(
            "dkv_http_request_duration_seconds",
            "Time to serve one HTTP request of the OpenAI API, to its last byte.",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            ("route", "status"),
        )
        app = FastAPI(title="dkv", summary="dkv's OpenAI-compatible API", docs_url=None, redoc_url=None)
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        app.add_api_route("/v1/completions", self.complete, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route(HEALTH, self.health, methods=["GET"])
        app.add_exception_handler(ApiError, _respond)
        app.add_exception_handler(RequestValidationError, _respond)
        app.add_exception_handler(HTTPException, _respond)
        app.add_exception_handler(Exception, _respond)
        self.app = _Guarded(app, Authenticator.of(settings), duration)

    async def chat(self, body: ChatRequest):
        messages = [m.for_template() for m in body.messages]
        return await self._answer(
            body,
            partial(chat_prompt, self.gateway.tokenizer, messages),
            sum(len(m["content"]) for m in messages),
            "chatcmpl",
            _chat_chunk,
            _chat_reply,
        )

    async def complete(self, body: CompletionRequest):
        return await self._answer(
            body,
            partial(completion_prompt, self.gateway.tokenizer, body.prompt),
            len(body.prompt) if isinstance(body.prompt, str) else 0,
            "cmpl",
            _text_chunk,
            _text_reply,
        )

    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0, "owned_by": "dkv"}]}

    async def health(self):
        if self.serving():
            return {"status": "ok"}
        return JSONResponse({"status": "stopping"}, status_code=503)

    async def _answer(self, body: _Generation, prompt, chars: int, prefix: str, chunk, whole):
        """Generate for ``body``, whose prompt's (context, query) ids ``prompt()`` gives from ``chars``
        characters of text: the reply ``whole(...)`` builds, or, streaming, the events ``chunk(...)``
        builds, once the first token is there."""
        if body.model != self.model:
            raise ApiError(
                404,
                f"model {body.model[:200]!r} is not served here; use {self.model!r} (GET /v1/models)",
                "not_found_error",
                "model",
                "model_not_found",
            )
        if chars > self.gateway.max_text_bytes:
            raise ApiError(
                400,
                f"the prompt holds {chars} characters; this gateway tokenizes at most "
                f"{self.gateway.max_text_bytes} (max_text_bytes): send a shorter one",
            )
        try:
            # as over gRPC: a long text takes the tokenizer milliseconds, off the event loop that serves every stream
            context, query = prompt() if chars < INLINE_TEXT else await asyncio.to_thread(prompt)
            prompt_tokens = len(context) + len(query)
            request = gateway_pb2.GenerateRequest(
                selection=body.selection,
                budget=body.budget,
                budget_fraction=body.budget_fraction,
                # unset: the rest of the window (at least 1: a prompt that fills it gets the gateway's error)
                max_new_tokens=body.new_tokens() or max(1, self.gateway.max_positions - prompt_tokens),
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed or 0,
                stop=body.stops(),
                tenant=tenant_for(body.tenant),
                ignore_eos=body.ignore_eos,
            )
            request.context_ids.ids.extend(context)
            request.query_ids.ids.extend(query)
            if body.recipe is not None:
                request.recipe.CopyFrom(recipe_to_proto(body.recipe.recipe()))
            about = _Reply(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.model, prompt_tokens)
            replies = self.gateway.generate(request)
            try:
                first = await anext(replies)  # errors before the first token get their HTTP status
            except BaseException:
                await replies.aclose()
                raise
        except Exception as e:
            raise api_error(e) from None
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return _EventStream(
                self._events(replies, first, about, chunk, usage), headers={"Cache-Control": "no-cache"}
            )
        pieces, stats = [], None
        try:
            async for item in _starting_with(first, replies):
                if item.HasField("token"):
                    pieces.append(item.token.text)
                else:
                    stats = item.stats
        except Exception as e:
            raise api_error(e) from None
        finally:
            await replies.aclose()
        self.observe(stats)
        return {
            **whole(about, "".join(pieces), FINISH_REASONS[stats.finish_reason]),
            "usage": about.usage(stats),
            "dkv": _stats(stats),
        }

    async def _events(self, replies: AsyncIterator, first, about: _Reply, chunk, usage: bool) -> AsyncIterator[str]:
        try:
            yield _sse(chunk(about, "", None, start=True))
            async for item in _starting_with(first, replies):
                if item.HasField("token"):
                    yield _sse(chunk(about, item.token.text, None))
                    continue
                self.observe(item.stats)
                yield _sse({**chunk(about, "", FINISH_REASONS[item.stats.finish_reason]), "dkv": _stats(item.stats)})
                if usage:
                    yield _sse({**chunk(about, "", None), "choices": [], "usage": about.usage(item.stats)})
        except Exception as e:
            error = api_error(e)
            log.warning("%s ended by an error: %s", about.id, error.message)
            yield _sse(error.body())
        finally:
            await replies.aclose()
        yield "data: [DONE]\n\n"


async def _starting_with(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for item in rest:
        yield item


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def _stats(stats: gateway_pb2.GenerateStats) -> dict:
    """``stats`` as JSON, every field present, without the decode worker's step-by-step detail."""
    summary = gateway_pb2.GenerateStats()
    summary.CopyFrom(stats)
    summary.ClearField("decode")
    return MessageToDict(summary, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def _chat_chunk(about: _Reply, text: str, finish: str | None, start: bool = False) -> dict:
    delta = {"role": "assistant", "content": text} if start else {"content": text} if finish is None else {}
    return {
        "id": about.id,
        "object": "chat.completion.chunk",
        "created": about.created,
        "model": about.model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _chat_reply(about: _Reply, text: str, finish: str) -> dict:
    return {
        "id": about.id,
        "object": "chat.completion",
        "created": about.created,
        "model": about.model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        ],
    }


def _text_chunk(about: _Reply, text: str, finish: str | None, start: bool = False) -> dict:
    return {
        "id": about.id,
        "object": "text_completion",
        "created": about.created,
        "model": about.model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def _text_reply(about: _Reply, text: str, finish: str) -> dict:
    return _text_chunk(about, text, finish)


async def _respond(_request, error: Exception) -> JSONResponse:
    """Every error as OpenAI's error object with its status."""
    if isinstance(error, RequestValidationError):
        error = _invalid(error)
    elif isinstance(error, HTTPException):  # no such route or method; a body too large
        kinds = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        error = ApiError(error.status_code, str(error.detail), kinds.get(error.status_code, "invalid_request_error"))
    return api_error(error).response()


def _invalid(error: RequestValidationError) -> ApiError:
    """FastAPI's validation errors (its 422) as one 400 that names each field and what is wrong with it."""
    problems, param = [], None
    for e in error.errors():
        where = ".".join(str(part) for part in e["loc"][1:])  # without "body"
        if e["type"] == "extra_forbidden":
            what = f"unknown field; dkv takes OpenAI's fields and its own: {', '.join(DKV_FIELDS)}"
        elif e["type"] == "json_invalid":
            where, what = "", f"the body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})"
        else:
            what = e["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {what}" if where else what)
        param = param or where or None
    return ApiError(400, "; ".join(problems), param=param)


class _EventStream(StreamingResponse):
    """Server-sent events whose generator is closed however the response ends, so a client that
    goes away ends its generation (the gateway closes the decode call) at once, not at garbage collection."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class _Guarded:
    """ASGI middleware, as the gRPC server's interceptor: the bearer token (every route but
    ``/health``), the request id, bodies bounded to ``MAX_MESSAGE_BYTES``, a log line and the
    duration histogram for every request."""

    def __init__(self, app, auth: Authenticator, duration):
        self.app, self.auth, self.duration = app, auth, duration

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        request_id.set(new_request_id(headers))
        started, status, received = time.perf_counter(), 500, 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_MESSAGE_BYTES:  # a chunked body that did not say its length
                raise HTTPException(413, _too_large().message)
            return message

        async def recorded_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            refused = self._refusal(scope["path"], headers)
            if refused is not None:
                await refused.response()(scope, receive, recorded_send)
                return
            await self.app(scope, bounded_receive, recorded_send)
        finally:
            seconds = time.perf_counter() - started
            route = scope["route"].path if "route" in scope else "unmatched"  # a bounded set of label values
            self.duration.labels(route, str(status)).observe(seconds)
            log.log(
                logging.WARNING if status >= 500 else logging.DEBUG,
                "%s %s %d in %.1f ms",
                scope["method"],
                route,
                status,
                seconds * 1e3,
                extra={"http": route, "status": status, "ms": round(seconds * 1e3, 2)},
            )

    def _refusal(self, path: str, headers) -> ApiError | None:
        """The error that ends this request before it is read, or None (and the caller's tenant is set)."""
        length = next((v for k, v in headers if k == "content-length"), "0")
        if not length.isdigit() or int(length) > MAX_MESSAGE_BYTES:
            return _too_large()
        if path == HEALTH:
            return None
        allowed, code, why = self.auth.check(path, headers, HOW_TO_AUTHENTICATE)
        if code is not None:
            return ApiError(401, why, "authentication_error", code="invalid_api_key")
        allowed_tenant.set(allowed)
        return None


def _too_large() -> ApiError:
    return ApiError(413, f"the request body is over {MAX_MESSAGE_BYTES >> 20} MiB; send a shorter prompt")


# ------------------------------------------------------------------------------------ the server


class _Uvicorn(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """None: the gateway's process handles SIGTERM and SIGINT (``serve_until_signal``) and stops this server."""
        yield


class HttpServer:
    """uvicorn serving ``app`` on ``settings.host:settings.http_port``, on the running event loop."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings
        self.port = 0
        self.server: _Uvicorn | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        s = self.settings
        check_port_free(s.host, s.http_port, "--http-port")
        host = s.host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, s.http_port))
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            ssl_certfile=s.tls_cert or None,
            ssl_keyfile=s.tls_key or None,
            ssl_ca_certs=s.tls_ca or None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if s.tls_ca else ssl.CERT_NONE,
        )
        config.load()  # a bad certificate raises here, before anything serves
        self.server = _Uvicorn(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()  # its error
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.port = sock.getsockname()[1]
        log.info("OpenAI API listening on %s://%s:%d/v1", "https" if s.tls_cert else "http", s.host, self.port)
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Refuse new connections; requests in flight (streams) get ``grace_s``, then are cancelled."""
        if self.task is None:
            return
        self.server.config.timeout_graceful_shutdown = grace_s
        self.server.should_exit = True
        await self.task
