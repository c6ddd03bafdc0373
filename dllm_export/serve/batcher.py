"""One worker thread that decodes queued requests in batches through `runtime.Decoding`.

Requests with batchable settings alike but for their length (`GenSettings.batch_key`: the block
length and steps per block, not max_tokens) are decoded together: their rows (n per prompt)
form one left-padded batch of at most `max_batch` rows; a request that cannot
join waits for a later batch, in arrival order. Batching is continuous where rows cannot change
each other's tokens (greedy, no shared quota: `Plan.rows_independent`): at every block boundary
queued requests with the same settings join the running decoding, from the queue's head, as
rows free up. The queue is bounded; a request that waits past its deadline, or whose client
left, is dropped, and a decoding whose clients have all left is stopped between two steps. A
request is answered as soon as each of its rows' committed left-to-right prefix holds its end
(an end token or a stop string; committed tokens never change, so that is its final text) or
its blocks are decoded, and its rows leave the decoding at the next block boundary. Results and
stream updates go back to the request's asyncio loop through thread-safe queue puts.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..runtime.loop import MAX_TOP_LOGPROBS, Decoding, Logprobs, loop_threads
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
    answered: bool = False  # its "done" went out
    enqueued: float = field(default_factory=time.monotonic)
    # while it decodes (set when it joins a decoding): the decoding's step count and clocks then,
    # the most rows it shared, and per row: its end was found, the committed prefix read / streamed
    nfe0: int = field(default=0, init=False)
    t0: float = field(default=0.0, init=False)
    started: float = field(default=0.0, init=False)
    batch_rows: int = field(default=0, init=False)
    ends: list = field(default_factory=list, init=False)
    read: list = field(default_factory=list, init=False)
    seen: list = field(default_factory=list, init=False)

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
            batch, rows, key = [], 0, first.settings.batch_key()
            for job in list(self._pending):
                if job is first or (first.batchable and job.batchable and job.settings.batch_key() == key
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
        key = first.settings.batch_key()
        return [j for j in self._pending if j.batchable and j.settings.batch_key() == key]

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
        """Run one decoding: the batch's jobs and (continuous batching) the queued jobs that join at
        its block boundaries; each job is answered as soon as its rows are done, and leaves."""
        s = batch[0].settings
        run = _Running(self, batch)
        try:
            run.dec = Decoding.create(self.engine.backend, on_canvas=run.on_step, **s.kwargs())
            # rows that join must leave the others' tokens unchanged: greedy, no shared quota
            joinable = batch[0].batchable and run.dec.plan.rows_independent
            for i, job in enumerate(batch):
                if not run.join(job):  # the canvas would outgrow the context: the rest waits, in order
                    with self._cv:
                        self._pending.extendleft(reversed(batch[i:]))
                        self._gauge()
                    break
            with loop_threads(run.dec.backend):
                while run.jobs:
                    run.dec.run_block()
                    run.boundary()
                    if joinable and run.jobs and not self._closing:
                        self._join_queued(run)
        except _AllLeft:
            pass
        except RequestError as e:
            run.fail(e)
        except Exception as e:  # a backend failure fails this batch, never the server
            log.exception("decoding a batch of %d rows failed", run.dec.x.shape[0] if run.dec else 0)
            run.fail(RequestError(f"decoding failed: {type(e).__name__}: {e}", None, "decode_failed", 500,
                                  "server_error"))
        finally:
            self._answered = time.monotonic()
            self._last_jobs = run.most_jobs

    def _join_queued(self, run: "_Running") -> None:
        """Let queued jobs join the running decoding at this block boundary, from the queue's head,
        while each has its schedule and fits the free rows and the context: the first that cannot
        join stops the scan (it runs next, so the arrival order holds and no request waits behind
        later ones)."""
        rows = run.dec.x.shape[0]
        with self._cv:
            for job in list(self._pending):
                if not (job.batchable and job.settings.batch_key() == run.key and rows + len(job.rows) <= self.max_batch
                        and run.join(job)):
                    break
                self._pending.remove(job)
                rows += len(job.rows)
                if self.metrics is not None and not job.cancelled:
                    self.metrics.joined.inc()
            self._gauge()


def _logprob_rows(record: Logprobs | None, k: int | None, a: int, b: int, lengths: list[int]) -> list[tuple] | None:
    """Rows a..b's (token log-probabilities, top-k log-probabilities, top-k ids) as lists, each row's
    first `lengths[r]` positions, or None when the request asked for none (the decoding records
    every k a request may ask for)."""
    if k is None:
        return None
    rows = []
    for r in range(a, b):
        n = lengths[r]
        top = (record.top[r, :n, :k].tolist(), record.top_ids[r, :n, :k].tolist()) if k else ([], [])
        rows.append((record.token[r, :n].tolist(), *top))
    return rows


def _committed_prefix(gen: torch.Tensor, mask_id: int, length: torch.Tensor) -> list[int]:
    """Each row's committed left-to-right prefix length: the index of its first mask (its `length`,
    the row's own positions, if none)."""
    masked = gen == mask_id
    return torch.where(masked.any(1), masked.int().argmax(1), length).tolist()


class _Running:
    """The decoding the worker runs: its jobs in row order (a job's rows are contiguous), their
    streams and early answers at every step, their answers and retirement at block boundaries."""

    def __init__(self, batcher: Batcher, batch: list[Job]):
        self.engine, self.metrics = batcher.engine, batcher.metrics
        self.key, self.record = batch[0].settings.batch_key(), None  # logprobs: recorded once a job asks
        self.batch = batch  # the jobs it started with (failed together when it cannot start)
        self.dec: Decoding | None = None
        self.jobs: list[Job] = []
        self.most_jobs = 0
        self.last = time.perf_counter()

    def spans(self):
        """(job, first row, end row) of every job in the decoding."""
        a = 0
        for job in self.jobs:
            yield job, a, a + len(job.rows)
            a += len(job.rows)

    def join(self, job: Job) -> bool:
        """Add a job's rows at the decoding's block boundary; False when the canvas would outgrow
        the model's context (the job waits for another decoding)."""
        if job.cancelled:
            return True
        if time.monotonic() > job.deadline:
            job.cancelled = True
            job.put(("error", _timeout()))
            return True
        if job.logprobs is not None and self.record is None:  # every top k a request may ask for
            self.record = Logprobs(MAX_TOP_LOGPROBS)
            self.dec.start_recording(self.record)
        try:
            self.dec.admit(job.rows, [job.suffix] * len(job.rows) if job.suffix else None,
                           gen_length=job.settings.gen_length)
        except InputError:
            if self.jobs:
                return False
            raise
        n = len(job.rows)
        job.nfe0, job.t0, job.started = self.dec.nfe, time.perf_counter(), time.monotonic()
        job.ends, job.read, job.seen = [False] * n, [0] * n, [0] * n
        self.jobs.append(job)
        self.most_jobs = max(self.most_jobs, len(self.jobs))
        rows = self.dec.x.shape[0]
        for j in self.jobs:
            j.batch_rows = max(j.batch_rows, rows)
        if self.metrics is not None:
            self.metrics.batch_rows.observe(rows)
        return True

    def _info(self, job: Job) -> dict:
        return {"nfe": self.dec.nfe - job.nfe0, "seconds": round(time.perf_counter() - job.t0, 4),
                "batch_rows": job.batch_rows, "queued_s": round(job.started - job.enqueued, 4)}

    def _answer(self, job: Job, rows: list[list[int]], a: int, b: int, lengths: list[int]) -> None:
        job.answered = True
        job.put(("done", rows, self._info(job), _logprob_rows(self.record, job.logprobs, a, b, lengths)))

    def on_step(self, x: torch.Tensor) -> None:
        """After every step: time out jobs, stream committed prefixes that grew, answer the jobs
        whose committed prefixes hold their ends (streamed jobs end themselves: the stream reads
        their ends); stop the decoding once every job is cancelled or answered."""
        t = time.perf_counter()
        if self.metrics is not None:
            self.metrics.step_seconds.observe(t - self.last)
        self.last, now = t, time.monotonic()
        gen = self.dec.generated
        prefix = _committed_prefix(gen, self.engine.spec.mask_id, self.dec.length)
        for job, a, b in self.spans():
            if not job.cancelled and now > job.deadline:
                job.cancelled = True
                job.put(("error", _timeout()))
            if job.cancelled or job.answered:
                continue
            if job.stream:
                if job.canvas or any(prefix[r] > job.seen[r - a] for r in range(a, b)):
                    job.put(("step", gen[a:b, :job.settings.gen_length].tolist(), prefix[a:b],
                             _logprob_rows(self.record, job.logprobs, a, b, prefix)))
                job.seen = prefix[a:b]
            elif self._ended(job, gen, prefix, a):
                if self.metrics is not None:
                    self.metrics.early_answers.inc()
                self._answer(job, [gen[r, :prefix[r]].tolist() for r in range(a, b)], a, b, prefix)
        if all(job.cancelled or job.answered for job in self.jobs):
            raise _AllLeft

    def _ended(self, job: Job, gen: torch.Tensor, prefix: list[int], a: int) -> bool:
        """Whether every row of `job` (from row a) has its end in its committed prefix: an end token,
        or a stop string; each row read again only when its prefix grew (an end, once found, stays:
        committed tokens stay), and without stop strings only the newly committed tokens."""
        for i in range(len(job.rows)):
            r = a + i
            if not job.ends[i] and prefix[r] > job.read[i]:
                if job.stops:
                    job.ends[i] = self.engine.text(gen[r, :prefix[r]].tolist(), job.stops)[1] is not None
                else:
                    job.ends[i] = not self.engine.end_ids.isdisjoint(gen[r, job.read[i]:prefix[r]].tolist())
                job.read[i] = prefix[r]
        return all(job.ends)

    def boundary(self) -> None:
        """After a block: answer the jobs whose rows are all decoded, retire the rows of the jobs that
        are answered or cancelled."""
        gen = None
        for job, a, b in self.spans():
            if not (job.cancelled or job.answered) and bool(self.dec.ended[a:b].all()):
                gen = self.dec.generated if gen is None else gen
                self._answer(job, gen[a:b, :job.settings.gen_length].tolist(), a, b, self.dec.length.tolist())
        # read once: a client that leaves cancels its job from the server's thread at any time
        gone = [job.cancelled or job.answered for job in self.jobs]
        if any(gone):
            self.dec.retire(torch.tensor([not g for job, g in zip(self.jobs, gone) for _ in job.rows]))
            self.jobs = [job for job, g in zip(self.jobs, gone) if not g]

    def fail(self, err: RequestError) -> None:
        """Hand `err` to every job of the decoding that has no answer yet."""
        for job in dict.fromkeys(self.batch + self.jobs):
            if not (job.answered or job.cancelled):
                job.put(("error", err))


def _timeout() -> RequestError:
    return RequestError("the request timed out", None, "timeout", 408, "timeout_error")
