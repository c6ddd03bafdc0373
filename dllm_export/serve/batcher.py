"""One worker thread that decodes queued requests in batches through `runtime.generate`.

Requests with equal, batchable settings (engine.GenSettings) are decoded together: their rows
(n per prompt) form one left-padded batch of at most `max_batch` rows; a request that cannot
join waits for a later batch, in arrival order. The queue is bounded; a request that waits past
its deadline, or whose client left, is dropped from the queue, and a running batch whose
clients have all left is stopped between two steps. A request is answered as soon as each of its
rows' committed left-to-right prefix holds its end (an end token or a stop string): committed
tokens never change, so that is its final text, and a batch whose requests are all answered
stops there. Results and stream updates go back to the request's asyncio loop through
thread-safe queue puts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..runtime.loop import Logprobs, generate
from .engine import Engine, GenSettings, RequestError

log = logging.getLogger(__name__)
RECENT_BATCHES = 8  # batch starts whose client counts set how many companions a batch waits for


@dataclass(eq=False)
class Job:
    """One request in the queue.

    Attributes:
        rows: prompt ids of every row (each prompt repeated n times, prompt-major).
        suffix: ids after every row's completion (infilling), or [].
        stops: the request's stop strings (its text ends at the first, or at an end token).
        logprobs: top tokens per position to return with each token's log-probability, or None.
        settings: the decoding settings (the batch key).
        loop / events: where updates go: ("step", generated [rows, gen] ids) when `stream`
            and a row's committed prefix grew (every step with `canvas`), with each row's
            prefix length and its logprob rows: ("step", ids, lengths, logprob rows or None); then
            ("done", ids, info, logprob rows or None) or ("error", RequestError). A logprob row is
            (token log-probabilities, top-k log-probabilities, top-k ids) of the row's tokens.
        deadline: time.monotonic() after which the request is dropped (timeout).
    """

    rows: list[list[int]]
    settings: GenSettings
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    deadline: float
    n: int = 1  # rows per prompt
    stream: bool = False
    canvas: bool = False
    cancelled: bool = False
    batchable: bool = True
    suffix: list[int] = field(default_factory=list)
    stops: tuple[str, ...] = ()
    logprobs: int | None = None
    answered: bool = False  # its "done" went out before the batch ended
    enqueued: float = field(default_factory=time.monotonic)

    def put(self, event: tuple) -> None:
        """Hand an event to the request's loop (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is gone
            self.cancelled = True


class _AllLeft(Exception):
    """Raised inside the loop's canvas hook: every request of the batch is cancelled or answered."""


class Batcher:
    """The bounded queue and its worker.

    Args:
        engine: the model.
        max_batch: rows per batch.
        max_queue: requests waiting at most (more are refused: `submit` raises RequestError 429).
        batch_wait: seconds the worker waits at most for companions of a batchable request, when
            recent batches saw several clients (it stops waiting once as many requests are queued
            as the most clients seen at the last RECENT_BATCHES batch starts).
        metrics: a metrics.Metrics (or None).
    """

    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 64, batch_wait: float = 0.05,
                 metrics=None):
        self.engine, self.max_batch, self.max_queue, self.batch_wait = engine, max_batch, max_queue, batch_wait
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._last_jobs = 0  # requests of the last batch
        self._answered = 0.0  # time.monotonic() when the last batch's answers went out
        # clients seen at recent batch starts (see _take)
        self._recent: deque[int] = deque([1], maxlen=RECENT_BATCHES)
        self._thread = threading.Thread(target=self._run, name="dllm-export-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; RequestError 429 when the queue is full, 503 when the server is shutting down."""
        if len(job.rows) > self.max_batch:
            prompts = len(job.rows) // job.n
            raise RequestError(f"{prompts} prompt{'s' if prompts > 1 else ''} x n {job.n} = {len(job.rows)} rows exceed "
                               f"this server's batch of {self.max_batch}", "n" if job.n > 1 else "prompt")
        with self._cv:
            if self._closing:
                raise RequestError("the server is shutting down", None, "shutting_down", 503, "server_error")
            if len(self._pending) >= self.max_queue:
                raise RequestError(f"the queue is full ({self.max_queue} requests waiting); retry later", None,
                                   "queue_full", 429, "server_overloaded")
            self._pending.append(job)
            self._gauge()
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """The client left or timed out: drop the job from the queue (a running batch skips it)."""
        job.cancelled = True
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
                self._gauge()

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, fail the queued ones (503), let the running batch finish, stop the worker."""
        with self._cv:
            self._closing = True
            pending, self._pending = list(self._pending), deque()
            self._cv.notify_all()
        for job in pending:
            job.put(("error", RequestError("the server shut down before this request ran", None, "shutting_down",
                                           503, "server_error")))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def depth(self) -> int:
        return len(self._pending)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._pending))

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and the compatible ones behind it (None when closing)."""
        with self._cv:
            while not self._pending and not self._closing:
                self._cv.wait()
            if self._closing:
                return None
            first = self._pending[0]
            # clients now: the last batch's (they are sending their next requests) and those whose
            # requests were queued before its answers went out (they cannot be the same clients)
            self._recent.append(self._last_jobs + sum(j.enqueued < self._answered for j in self._pending))
            expect = max(self._recent)
            if first.batchable and len(first.rows) < self.max_batch and expect > 1:
                # under concurrency (several clients at recent batch starts) companions that arrive
                # within batch_wait join this batch; the wait ends once that many requests are here,
                # since waiting longer for clients that may not come idles the worker; a lone client
                # does not wait
                end = time.monotonic() + self.batch_wait
                while (not self._closing and (left := end - time.monotonic()) > 0
                       and self._rows_like(first) < self.max_batch and self._jobs_like(first) < expect):
                    self._cv.wait(left)
            batch, rows = [], 0
            for job in list(self._pending):
                if job is first or (first.batchable and job.batchable and job.settings == first.settings
                                    and rows + len(job.rows) <= self.max_batch):
                    batch.append(job)
                    rows += len(job.rows)
                    self._pending.remove(job)
                    if not first.batchable:
                        break
            self._gauge()
            self._last_jobs = len(batch)
            return batch

    def _like(self, first: Job) -> list[Job]:
        return [j for j in self._pending if j.batchable and j.settings == first.settings]

    def _rows_like(self, first: Job) -> int:
        return sum(len(j.rows) for j in self._like(first))

    def _jobs_like(self, first: Job) -> int:
        return len(self._like(first))

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            now = time.monotonic()
            for job in batch:
                if not job.cancelled and now > job.deadline:
                    job.cancelled = True
                    job.put(("error", _timeout()))
            batch = [j for j in batch if not j.cancelled]
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        """Run one batch and hand every job its rows."""
        rows = [r for job in batch for r in job.rows]
        spans, start = [], 0
        for job in batch:
            spans.append((start, start + len(job.rows)))
            start += len(job.rows)
        # rows of other suffixes (or none) share the batch: generate right-pads them, as it left-pads prompts
        suffixes = [job.suffix for job in batch for _ in job.rows]
        P, G = max(len(r) for r in rows), batch[0].settings.gen_length
        mask_id = self.engine.spec.mask_id
        started, t0 = time.monotonic(), time.perf_counter()
        last = {"t": t0, "prefix": [0] * len(rows), "steps": 0}
        ended = _Ends(self.engine, len(rows))
        # the largest top k any request asks for, read while decoding (streams, early answers)
        wanted = [job.logprobs for job in batch if job.logprobs is not None]
        record = Logprobs(max(wanted)) if wanted else None

        def on_canvas(x: torch.Tensor) -> None:
            t = time.perf_counter()
            if self.metrics is not None:
                self.metrics.step_seconds.observe(t - last["t"])
            last["t"] = t
            last["steps"] += 1
            now = time.monotonic()
            for job in batch:
                if not job.cancelled and now > job.deadline:
                    job.cancelled = True
                    job.put(("error", _timeout()))
            gen = x[:, P:P + G]
            prefix = _committed_prefix(gen, mask_id)
            if any(job.stream for job in batch):
                self._stream_step(batch, spans, gen, prefix, last["prefix"], record)
            for job, (a, b) in zip(batch, spans):  # streamed jobs end themselves (the stream reads their ends)
                if not (job.cancelled or job.answered or job.stream) and ended.all(job, gen, prefix, a, b):
                    job.answered = True
                    if self.metrics is not None:
                        self.metrics.early_answers.inc()
                    info = {"nfe": last["steps"], "seconds": round(t - t0, 4), "batch_rows": len(rows)}
                    job.put(("done", [gen[r, :prefix[r]].tolist() for r in range(a, b)],
                             {**info, "queued_s": round(started - job.enqueued, 4)},
                             _logprob_rows(record, job.logprobs, a, b, prefix)))
            if all(job.cancelled or job.answered for job in batch):
                raise _AllLeft

        if self.metrics is not None:
            self.metrics.batch_rows.observe(len(rows))
        s = batch[0].settings
        err = None
        try:
            out = generate(self.engine.backend, rows, on_canvas=on_canvas, logprobs=record,
                           suffix_ids=suffixes if any(suffixes) else None, **s.kwargs())
        except _AllLeft:
            return
        except RequestError as e:
            err = e
        except Exception as e:  # a backend failure fails this batch, never the server
            log.exception("decoding a batch of %d rows failed", len(rows))
            err = RequestError(f"decoding failed: {type(e).__name__}: {e}", None, "decode_failed", 500,
                               "server_error")
        finally:
            self._answered = time.monotonic()
        if err is not None:
            for job in batch:
                if not job.answered:
                    job.put(("error", err))
            return
        gen = out.generated
        info = {"nfe": out.nfe, "seconds": round(out.seconds, 4), "batch_rows": len(rows)}
        for job, (a, b) in zip(batch, spans):
            if not (job.cancelled or job.answered):
                job.put(("done", gen[a:b].tolist(), {**info, "queued_s": round(started - job.enqueued, 4)},
                         _logprob_rows(record, job.logprobs, a, b)))

    @staticmethod
    def _stream_step(batch: list[Job], spans, gen: torch.Tensor, prefix: list[int], seen: list[int],
                     record: Logprobs | None) -> None:
        """Send streaming jobs their rows (and their committed prefixes' logprobs) when a committed
        left-to-right prefix grew."""
        for job, (a, b) in zip(batch, spans):
            if job.cancelled or not job.stream:
                continue
            if job.canvas or any(prefix[r] > seen[r] for r in range(a, b)):
                job.put(("step", gen[a:b].tolist(), prefix[a:b], _logprob_rows(record, job.logprobs, a, b, prefix)))
        seen[:] = prefix


def _logprob_rows(record: Logprobs | None, k: int | None, a: int, b: int,
                  lengths: list[int] | None = None) -> list[tuple] | None:
    """Rows a..b's (token log-probabilities, top-k log-probabilities, top-k ids) as lists, each row's
    first `lengths[r]` positions (all without), or None when the request asked for none (the batch
    records the largest k its requests asked for)."""
    if k is None:
        return None
    rows = []
    for r in range(a, b):
        n = record.token.shape[1] if lengths is None else lengths[r]
        top = (record.top[r, :n, :k].tolist(), record.top_ids[r, :n, :k].tolist()) if k else ([], [])
        rows.append((record.token[r, :n].tolist(), *top))
    return rows


def _committed_prefix(gen: torch.Tensor, mask_id: int) -> list[int]:
    """Each row's committed left-to-right prefix length: the index of its first mask (all if none)."""
    masked = gen == mask_id
    return torch.where(masked.any(1), masked.int().argmax(1), gen.shape[1]).tolist()


class _Ends:
    """Which rows' committed prefix holds their text's end (an end token or a stop string), each
    row read again only when its prefix grew: once found, an end stays (committed tokens stay)."""

    def __init__(self, engine: Engine, rows: int):
        self.engine = engine
        self.done, self.read = [False] * rows, [0] * rows

    def all(self, job: Job, gen: torch.Tensor, prefix: list[int], a: int, b: int) -> bool:
        """Whether every row of `job` (rows a..b) has ended. Without stop strings only the newly
        committed tokens are looked at (no decoding: a step costs milliseconds)."""
        for r in range(a, b):
            if not self.done[r] and prefix[r] > self.read[r]:
                if job.stops:
                    self.done[r] = self.engine.text(gen[r, :prefix[r]].tolist(), job.stops)[1] is not None
                else:
                    self.done[r] = not self.engine.end_ids.isdisjoint(gen[r, self.read[r]:prefix[r]].tolist())
                self.read[r] = prefix[r]
        return all(self.done[a:b])


def _timeout() -> RequestError:
    return RequestError("the request timed out", None, "timeout", 408, "timeout_error")
