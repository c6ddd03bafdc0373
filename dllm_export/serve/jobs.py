"""A generation request's way through the server, shared by the OpenAI and the Ollama routes:
checked and queued as a `Job` (`submit`), then followed to its answer (`events`)."""

from __future__ import annotations

import asyncio
import time

from .batcher import Batcher, Job
from .engine import Engine, RequestError


async def submit(app, body, chat: bool) -> tuple[Job, tuple[str, ...], dict, list[str] | None]:
    """Check one OpenAI-shaped request (schemas.CompletionRequest / ChatRequest) and queue it:
    (its job, stop strings, usage so far, echoed prompts or None)."""
    engine: Engine = app.state.engine
    batcher: Batcher = app.state.batcher
    body.unsupported()
    if body.model is not None and body.model != engine.model_id:
        raise no_model(body.model, engine, "model")
    stops = body.stops()
    texts = None if chat else body.prompts()
    # tokenizing a long prompt takes a while: off the event loop, which serves every other client
    prompts, suffix = await asyncio.to_thread(
        lambda: ([engine.encode_chat([m.as_dict() for m in body.messages])], []) if chat
        else ([engine.encode(p) for p in texts], engine.encode_suffix(body.suffix)))
    settings = engine.settings(body, [len(p) for p in prompts], len(suffix))
    job = Job(rows=[p for p in prompts for _ in range(body.n)], settings=settings, loop=asyncio.get_running_loop(),
              events=asyncio.Queue(), deadline=time.monotonic() + app.state.cfg.timeout, n=body.n, stream=body.stream,
              canvas=body.canvas, batchable=engine.batchable(settings), suffix=suffix, stops=stops,
              logprobs=body.wanted_logprobs())
    echoes = [_echo(engine, t, p) for t, p in zip(texts, prompts)] if getattr(body, "echo", False) else None
    batcher.submit(job)
    return job, stops, {"prompt_tokens": sum(len(p) + len(suffix) for p in prompts)}, echoes


def no_model(name: str, engine: Engine, param: str | None) -> RequestError:
    return RequestError(f"the model {name!r} does not exist (this server has {engine.model_id!r})", param,
                        "model_not_found", 404)


def _echo(engine: Engine, text, ids: list[int]) -> str:
    return text if isinstance(text, str) else engine.tokenizer.decode(ids, skip_special_tokens=True)


async def events(batcher: Batcher, job: Job, request):
    """The job's events until done or error; a client that leaves (`request`, a starlette Request,
    polled) or a deadline cancels the job."""
    try:
        while True:
            left = job.deadline - time.monotonic()
            if left <= 0:
                yield ("error", RequestError("the request timed out", None, "timeout", 408, "timeout_error"))
                return
            try:
                event = await asyncio.wait_for(job.events.get(), timeout=min(left, 0.5))
            except asyncio.TimeoutError:
                if request is not None and await request.is_disconnected():
                    return
                continue
            yield event
            if event[0] in ("done", "error"):
                return
    finally:  # also on a client disconnect (the stream's task is cancelled): free the slot
        batcher.cancel(job)
