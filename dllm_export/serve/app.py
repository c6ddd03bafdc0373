"""The OpenAI-compatible HTTP app (FastAPI) and its uvicorn server.

Routes: POST /v1/completions, POST /v1/chat/completions (stream: server-sent events),
GET /v1/models, GET /health, GET /metrics (Prometheus), and Ollama's /api/* (`ollama`). Every
refused request is answered with OpenAI's error shape {"error": {"message", "type", "param",
"code"}} (Ollama's {"error": message} on its routes) and a 4xx status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import DllmExportError
from .batcher import Batcher, Job
from .engine import Engine, RequestError, TextStream
from .jobs import events, no_model, submit
from .metrics import Metrics
from .ollama import add_routes as add_ollama_routes
from .schemas import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class ServeConfig:
    """Server settings.

    Attributes:
        host / port: where to listen (loopback unless told otherwise).
        max_batch: rows decoded together at most.
        max_queue: requests waiting at most; more get 429.
        batch_wait: seconds the worker waits for compatible requests to join a batch (under concurrency).
        timeout: seconds a request may take, waiting included (408 after).
        api_key: when set, /v1/* need `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies get 413.
        graceful_timeout: seconds in-flight requests get to finish at shutdown.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8
    max_queue: int = 64
    batch_wait: float = 0.05
    timeout: float = 300.0
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    graceful_timeout: float = 30.0

    def __post_init__(self):
        from ..checks import check_fields
        from ..errors import InputError

        check_fields(self, ints=("port", "max_batch", "max_queue", "max_body_bytes"),
                     reals=("batch_wait", "timeout", "graceful_timeout"), strs=("host", "api_key"))
        if not 0 <= self.port <= 65535:
            raise InputError(f"port must lie in 0..65535 (0: a free one), got {self.port}")
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.timeout > 0:  # `not >` refuses NaN too
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout}")
        for name in ("batch_wait", "graceful_timeout"):
            if not getattr(self, name) >= 0:
                raise InputError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")


GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions", "/api/generate", "/api/chat")
ROUTES = GENERATION_ROUTES + ("/v1/models", "/health", "/metrics", "/api/tags", "/api/show", "/api/ps", "/api/version")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, path: str = "") -> JSONResponse:
    """A JSON error in OpenAI's shape, or Ollama's {"error": message} on its routes (`path` under
    /api/). A timeout (408) says `x-should-retry: false`: the official OpenAI clients would
    otherwise resend the same long generation twice more."""
    if path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers={"x-should-retry": "false"} if status == 408 else None)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first problem of a body, and the field."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if kind == "extra_forbidden":
        return f"unknown field {where!r}", param
    if kind == "missing":
        return f"missing required field {where!r}", param
    return f"{where}: {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:80]})", param


class _Guard:
    """ASGI middleware: refuses /v1/* and /api/* requests without the API key (401, before their
    body is read), bodies over the limit (413), and counts every answer in the metrics."""

    def __init__(self, app, max_body: int, metrics: Metrics, api_key: str | None = None):
        self.app, self.max_body, self.metrics, self.api_key = app, max_body, metrics, api_key

    def _authorized(self, scope) -> bool:
        if self.api_key is None or not scope["path"].startswith(("/v1/", "/api/")):
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        return hmac.compare_digest(given, f"Bearer {self.api_key}".encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status, t0, received = [500], time.perf_counter(), [0]
        length = dict(scope.get("headers") or []).get(b"content-length", b"0")
        too_large = f"the request body exceeds {self.max_body} bytes"

        async def guarded_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                received[0] += len(msg.get("body", b""))
                if received[0] > self.max_body:  # chunked bodies carry no Content-Length
                    raise HTTPException(413, too_large)
            return msg

        async def counted_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            if not self._authorized(scope):
                await error_response(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                                     code="invalid_api_key", path=scope["path"])(scope, receive, counted_send)
            elif length.isdigit() and int(length) > self.max_body:
                await error_response(413, too_large, code="body_too_large",
                                     path=scope["path"])(scope, receive, counted_send)
            else:
                await self.app(scope, guarded_receive, counted_send)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            if route in GENERATION_ROUTES:
                self.metrics.request_seconds.observe(time.perf_counter() - t0)


def create_app(engine: Engine, cfg: ServeConfig = ServeConfig()) -> FastAPI:
    """The app serving `engine`; its batcher starts and stops with the app's lifespan."""
    metrics = Metrics()
    batcher = Batcher(engine, max_batch=cfg.max_batch, max_queue=cfg.max_queue, batch_wait=cfg.batch_wait,
                      metrics=metrics)

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await asyncio.to_thread(batcher.close, cfg.graceful_timeout)

    app = FastAPI(title="dllm-export", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.cfg = engine, batcher, metrics, cfg
    app.add_middleware(_Guard, max_body=cfg.max_body_bytes, metrics=metrics, api_key=cfg.api_key)
    _add_error_handlers(app)
    model = {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "dllm-export",
             "family": engine.spec.family, "backend": getattr(engine.backend, "name", "?"),
             "context_length": engine.context}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id, "queue": batcher.depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str):
        if model_id != engine.model_id:
            raise no_model(model_id, engine, "model")
        return model

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _respond(app, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await _respond(app, body, request, chat=True)

    add_ollama_routes(app)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, path=request.url.path)

    @app.exception_handler(DllmExportError)
    async def library_error(request, exc: DllmExportError):
        return error_response(400, str(exc), path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param, path=request.url.path)

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return error_response(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                              code="body_too_large" if exc.status_code == 413 else None, path=request.url.path)

    @app.exception_handler(Exception)
    async def internal(request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", path=request.url.path)


async def _respond(app: FastAPI, body, request: Request, chat: bool):
    """Validate, queue, and answer one generation request (JSON, or SSE when body.stream)."""
    job, stops, usage, echoes = await submit(app, body, chat)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": app.state.engine.model_id}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(app, job, stops, meta, usage, chat, include_usage, echoes),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    async for event in events(app.state.batcher, job, request):
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            return _full_response(app.state.engine, event[1], event[2], stops, meta, usage, chat, echoes, body.n,
                                  app.state.metrics, event[3])
    raise RequestError("the client left", None, "client_closed", 499)


def _full_response(engine: Engine, rows: list[list[int]], info: dict, stops, meta: dict, usage: dict, chat: bool,
                   echoes: list[str] | None, n: int, metrics: Metrics, logprobs: list[tuple] | None = None) -> dict:
    choices, used = [], 0
    for i, tokens in enumerate(rows):
        text, reason, k = engine.text(tokens, stops)
        used += k
        lp = None if logprobs is None else engine.logprobs(tokens[:k], *logprobs[i], chat)
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                            "finish_reason": reason or "length"})
        else:
            prefix = echoes[i // n] if echoes else ""
            choices.append({"index": i, "text": prefix + text, "logprobs": lp, "finish_reason": reason or "length"})
    usage = {**usage, "completion_tokens": used, "total_tokens": usage["prompt_tokens"] + used}
    metrics.prompt_tokens.inc(usage["prompt_tokens"])
    metrics.completion_tokens.inc(used)
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices, "usage": usage,
            "dllm": info}


def _chunk(meta: dict, chat: bool, index: int, text: str | None, reason: str | None, role: bool = False,
           logprobs: dict | None = None) -> dict:
    if chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": reason}
    return {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [choice]}


def _sse_data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _sse(app: FastAPI, job: Job, stops, meta: dict, usage: dict, chat: bool, include_usage: bool,
               echoes: list[str] | None = None):
    """Server-sent events of a streamed request: each choice's role (chat) or echoed prompt, deltas
    of its committed prefix, a last chunk with its finish reason, the usage chunk when asked for,
    then [DONE]."""
    engine: Engine = app.state.engine
    streams = [TextStream(engine, stops) for _ in job.rows]
    for i in range(len(streams)):
        if chat:
            yield _sse_data(_chunk(meta, chat, i, None, None, role=True))
        elif echoes and echoes[i // job.n]:
            yield _sse_data(_chunk(meta, chat, i, echoes[i // job.n], None))
    async for event in events(app.state.batcher, job, None):
        if event[0] == "error":
            err = event[1]
            yield _sse_data({"error": {"message": err.message, "type": err.type, "param": err.param,
                                       "code": err.code}})
            break
        final = event[0] == "done"
        rows, lp_rows = event[1], event[3]
        for i, (s, tokens) in enumerate(zip(streams, rows)):
            delta, reason, lp = s.advance(tokens, final, 0 if final else event[2][i],
                                          None if lp_rows is None else lp_rows[i], chat)
            if delta or reason:
                yield _sse_data(_chunk(meta, chat, i, delta, reason, logprobs=lp))
        if all(s.reason is not None for s in streams):
            break  # every choice is finished (end token or stop string): `events` frees the slot
        if job.canvas and not final:
            yield _sse_data({**meta, "object": "dllm.canvas", "choices": [], "canvas": _canvas(engine, rows)})
    used = sum(s.tokens for s in streams)
    app.state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
    app.state.metrics.completion_tokens.inc(used)
    if include_usage:
        total = {**usage, "completion_tokens": used, "total_tokens": usage["prompt_tokens"] + used}
        yield _sse_data({**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [],
                         "usage": total})
    yield "data: [DONE]\n\n"


def _canvas(engine: Engine, rows: list[list[int]]) -> list[dict]:
    """Each row's canvas: one string per position, null where it is still masked."""
    mask = engine.spec.mask_id
    return [{"index": i, "tokens": [None if t == mask else engine.tokenizer.decode([t]) for t in row]}
            for i, row in enumerate(rows)]


def make_server(engine: Engine, cfg: ServeConfig = ServeConfig(), log_level: str = "info"):
    """A uvicorn.Server for the app (run it with `.run()`; `.should_exit = True` stops it gracefully)."""
    import uvicorn

    config = uvicorn.Config(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level=log_level,
                            timeout_graceful_shutdown=cfg.graceful_timeout, access_log=log_level == "debug")
    return uvicorn.Server(config)


def bind_socket(host: str, port: int):
    """A listening-ready socket on host:port (port 0: a free one); InputError when it cannot bind."""
    import socket

    from ..errors import InputError

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (OSError, OverflowError) as e:  # OverflowError: a port outside 0..65535
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)
    return sock
