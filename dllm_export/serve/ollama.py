"""Ollama's API beside OpenAI's, for the clients that speak it (Ollama's Python and JS clients, Open
WebUI, ...): POST /api/generate and /api/chat (NDJSON streams unless `"stream": false`), GET
/api/tags, POST /api/show, GET /api/ps, GET /api/version.

A request becomes the OpenAI routes' request (`schemas`), so it is checked, queued, batched and
decoded as those are: /api/chat and /api/generate through the model's chat template (`system`,
`prompt`), /api/generate with `raw` or a `suffix` (infilling) as a plain completion. Sampling and
the dLLM settings go in `options`: Ollama's `num_predict`, `temperature`, `top_p`, `top_k`, `seed`,
`stop`, and `steps`, `block_length`, `sampler`, `threshold`, `cache`, `preset`, ... (top-level
`steps`, Ollama's diffusion steps, too). Options that only place or size a llama.cpp runtime are
ignored; penalties and other samplers' settings are refused unless neutral. Answers take Ollama's
shapes, errors `{"error": message}` with a 4xx status (in a stream: an error line).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Any, Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import EXTENSIONS, RequestError, TextStream
from .jobs import events, no_model, submit
from .schemas import ChatRequest, CompletionRequest

# Ollama options and the OpenAI request fields they set
RENAMED = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
           "seed": "seed", "stop": "stop"}
# options that place or size llama.cpp's runtime: nothing of the answer depends on them here
IGNORED = ("numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
           "use_mmap", "use_mlock", "embedding_only", "num_thread", "num_keep")
# other samplers' settings, accepted at the value that turns them off
NEUTRAL = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "tfs_z": 1.0, "typical_p": 1.0,
           "min_p": 0.0, "mirostat": 0, "repeat_last_n": None, "mirostat_tau": None, "mirostat_eta": None,
           "penalize_newline": None}
VERSION = "0.6.0"  # the Ollama API this module answers as (clients check it before they talk)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1)
    stream: bool | None = None
    options: dict[str, Any] | None = None
    format: Union[str, dict, None] = None
    keep_alive: Union[int, float, str, None] = None
    think: Union[bool, str, None] = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def loads_only(self) -> bool:
        """Ollama's way to load a model: a request with nothing to answer."""
        raise NotImplementedError

    def inputs(self) -> tuple[dict[str, Any], bool]:
        """The OpenAI request's prompt fields, and whether they go through the chat template."""
        raise NotImplementedError

    def refused(self) -> None:
        """RequestError for what diffusion decoding here cannot honour."""
        if self.format not in (None, ""):
            raise RequestError("format (structured output) is not supported", "format", "unsupported_parameter")
        if self.think not in (None, False):
            raise RequestError("think is not supported: these models do not think apart", "think",
                               "unsupported_parameter")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", "top_logprobs")


class GenerateBody(_Body):
    """POST /api/generate."""

    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = None
    images: list | None = None
    steps: int | None = None  # Ollama's diffusion steps
    width: int | None = None
    height: int | None = None

    def refused(self) -> None:
        super().refused()
        if self.template:
            raise RequestError("template is not supported: the tokenizer's chat template applies", "template",
                               "unsupported_parameter")
        if self.context:
            raise RequestError("context is not supported: send the conversation to /api/chat", "context",
                               "unsupported_parameter")
        for name in ("images", "width", "height"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported: this is a text model", name, "unsupported_parameter")
        if self.steps is not None and (self.options or {}).get("steps", self.steps) != self.steps:
            raise RequestError("steps and options.steps differ", "steps")

    def loads_only(self) -> bool:
        return not (self.prompt or self.suffix)

    def inputs(self) -> tuple[dict[str, Any], bool]:
        extra = {} if self.steps is None else {"steps": self.steps}
        if self.raw or self.suffix:  # the prompt as it stands; a suffix is infilling around the answer
            if self.system:
                raise RequestError("system needs the chat template: leave raw and suffix out", "system")
            if not self.prompt:
                raise RequestError("the prompt is empty", "prompt")
            return {**extra, "prompt": self.prompt, "suffix": self.suffix or None}, False
        system = [{"role": "system", "content": self.system}] if self.system else []
        return {**extra, "messages": system + [{"role": "user", "content": self.prompt or ""}]}, True


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    thinking: str | None = None  # an assistant turn's own thinking: chat templates drop it
    images: list | None = None
    tool_calls: list | None = None
    tool_name: str | None = None


class ChatBody(_Body):
    """POST /api/chat."""

    messages: list[ChatMessage] = Field(default_factory=list)  # none: load the model (Ollama's way)
    tools: list | None = None

    def refused(self) -> None:
        super().refused()
        if self.tools:
            raise RequestError("tools are not supported", "tools", "unsupported_parameter")
        for m in self.messages:
            if m.role == "tool" or m.tool_calls or m.tool_name:
                raise RequestError("tool messages are not supported", "messages", "unsupported_parameter")
            if m.images:
                raise RequestError("images are not supported: this is a text model", "messages",
                                   "unsupported_parameter")

    def loads_only(self) -> bool:
        return not self.messages

    def inputs(self) -> tuple[dict[str, Any], bool]:
        return {"messages": [{"role": m.role, "content": m.content or ""} for m in self.messages]}, True


def openai_fields(options: dict[str, Any] | None) -> dict[str, Any]:
    """The OpenAI request fields of Ollama `options` (RequestError for unknown or unsupported ones)."""
    fields: dict[str, Any] = {}
    for key, value in (options or {}).items():
        if key == "num_predict":  # -1: no limit, -2: fill the context: the server's default here
            fields["max_tokens"] = None if value in (-1, -2) else value
        elif key in RENAMED or key in EXTENSIONS:
            fields[RENAMED.get(key, key)] = value
        elif key in NEUTRAL:
            if NEUTRAL[key] is not None and value not in (None, NEUTRAL[key]):
                raise RequestError(f"options.{key} is not supported by diffusion decoding (only {NEUTRAL[key]})",
                                   f"options.{key}", "unsupported_parameter")
        elif key not in IGNORED:
            raise RequestError(f"unknown option {key!r}", f"options.{key}")
    return fields


def _checked(cls, fields: dict[str, Any]):
    """cls (an OpenAI request model) of `fields`; a RequestError naming the Ollama field at fault."""
    try:
        return cls.model_validate(fields)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]) if err.get("loc") else "body"
        ollama = {v: k for k, v in RENAMED.items()}.get(name, name)
        where = f"options.{ollama}" if ollama in RENAMED or ollama in EXTENSIONS else ollama
        raise RequestError(f"{where}: {err.get('msg')} (got {json.dumps(err.get('input'), default=str)[:80]})",
                           where) from None


def _accept(body: GenerateBody | ChatBody, engine) -> None:
    """RequestError for a body this server cannot answer at all (refused fields, another model)."""
    body.refused()
    if body.model != engine.model_id:
        raise no_model(body.model, engine, "model")


def _request(body: GenerateBody | ChatBody, engine) -> tuple[CompletionRequest | ChatRequest, bool]:
    """The OpenAI request an Ollama body stands for, and whether it goes through the chat template."""
    _accept(body, engine)
    inputs, chat = body.inputs()
    fields = {"model": body.model, "stream": False, **openai_fields(body.options), **inputs}
    if body.logprobs:
        fields.update({"logprobs": True, "top_logprobs": body.top_logprobs or 0} if chat else
                      {"logprobs": body.top_logprobs or 0})
    return _checked(ChatRequest if chat else CompletionRequest, fields), chat


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _logprobs(chat_logprobs: dict) -> list[dict]:
    """Ollama's logprobs [{token, logprob, top_logprobs: [{token, logprob}]}] of OpenAI chat ones."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
            for e in chat_logprobs["content"]]


def _object(engine, chat_route: bool, text: str, **rest) -> dict:
    """One object of an answer: the model, the time, the text (a chat message or a response), `rest`."""
    said = {"message": {"role": "assistant", "content": text}} if chat_route else {"response": text}
    return {"model": engine.model_id, "created_at": _now(), **said, **rest}


def _final(app, chat_route: bool, t0: float, usage: dict, used: int, reason: str, job, text: str = "") -> dict:
    """The last object of an answer: done, why, token counts and durations (ns; diffusion has no
    separate prompt pass: the prompt is decoded with every step, so its eval time is 0)."""
    app.state.metrics.prompt_tokens.inc(usage["prompt_tokens"])
    app.state.metrics.completion_tokens.inc(used)
    now = time.perf_counter()
    return _object(app.state.engine, chat_route, text, done=True, done_reason=reason,
                   total_duration=int((now - t0) * 1e9), load_duration=0, prompt_eval_count=usage["prompt_tokens"],
                   prompt_eval_duration=0, eval_count=used, eval_duration=int((now - job.t0) * 1e9) if job.t0 else 0)


async def _answer(app, body, request: Request, chat_route: bool):
    """Answer one /api/generate or /api/chat request: JSON, or NDJSON lines unless stream is false."""
    t0 = time.perf_counter()
    engine = app.state.engine
    if body.loads_only():  # the model is loaded already: say so (checked like any request)
        _accept(body, engine)
        out = _object(engine, chat_route, "", done=True, done_reason="load")
        if body.stream is False:
            return out
        return StreamingResponse(iter([json.dumps(out) + "\n"]), media_type="application/x-ndjson")
    req, chat = _request(body, engine)
    job, stops, usage, _ = await submit(app, req, chat)
    if body.stream is not False:
        return StreamingResponse(_ndjson(app, job, stops, usage, chat_route, t0), media_type="application/x-ndjson")
    async for event in events(app.state.batcher, job, request):
        if event[0] == "error":
            raise event[1]
        if event[0] == "done":
            tokens = event[1][0]
            text, reason, used = engine.text(tokens, stops)
            out = _final(app, chat_route, t0, usage, used, reason or "length", job, text)
            if event[3] is not None:
                out["logprobs"] = _logprobs(engine.logprobs(tokens[:used], *event[3][0], True))
            return out
    raise RequestError("the client left", None, "client_closed", 499)


async def _ndjson(app, job, stops, usage: dict, chat_route: bool, t0: float):
    """The NDJSON lines of a streamed answer: each delta of the committed text, then the last
    object (done, with counts and durations); an error line if the request fails."""
    engine = app.state.engine
    s = TextStream(engine, stops)
    async for event in events(app.state.batcher, job, None):
        if event[0] == "error":
            yield json.dumps({"error": event[1].message}) + "\n"
            return
        final = event[0] == "done"
        delta, reason, lp = s.advance(event[1][0], final, 0 if final else event[2][0],
                                      None if event[3] is None else event[3][0], True)
        lp = None if lp is None else _logprobs(lp)
        if delta or lp:
            yield json.dumps(_object(engine, chat_route, delta, done=False,
                                     **({} if lp is None else {"logprobs": lp}))) + "\n"
        if reason is not None:
            yield json.dumps(_final(app, chat_route, t0, usage, s.tokens, reason, job)) + "\n"
            return


def add_routes(app: FastAPI) -> None:
    """Ollama's routes on `app` (create_app's: its engine, batcher, metrics and limits)."""
    engine = app.state.engine
    details = {"parent_model": "", "format": getattr(engine.backend, "name", "?"), "family": engine.spec.family,
               "families": [engine.spec.family], "parameter_size": "", "quantization_level": ""}
    entry = {"name": engine.model_id, "model": engine.model_id, "modified_at": "1970-01-01T00:00:00Z", "size": 0,
             "digest": "", "details": details}

    @app.get("/api/version")
    async def version():
        return {"version": VERSION}

    @app.get("/api/tags")
    async def tags():
        return {"models": [entry]}

    @app.get("/api/ps")
    async def ps():
        return {"models": [{**entry, "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                            "context_length": engine.context}]}

    @app.post("/api/show")
    async def show(body: dict):
        name = body.get("model") or body.get("name")
        if name != engine.model_id:
            raise no_model(str(name), engine, "model")
        return {"modelfile": "", "parameters": "", "template": "", "details": details,
                "model_info": {"general.architecture": engine.spec.family,  # clients read <arch>.context_length
                               f"{engine.spec.family}.context_length": engine.context},
                "capabilities": ["completion", "insert"]}

    @app.post("/api/generate")
    async def generate(body: GenerateBody, request: Request):
        return await _answer(app, body, request, chat_route=False)

    @app.post("/api/chat")
    async def chat(body: ChatBody, request: Request):
        return await _answer(app, body, request, chat_route=True)
