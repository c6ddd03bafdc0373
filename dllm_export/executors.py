"""Executors: where the independent cells of a grid (`report`, `build`) run.

A grid is a list of `Cell`s, each with a stable key. A cell function `fn(cell) -> value` computes
one cell from its arguments alone and keeps its results under a path shared by every worker, so
the process, the machine and the order it runs in change nothing: every cell is seeded from its
key (`seed_for`) before it starts, and results come back in the order of the grid.

    local  in this process, one cell after the other (the default).
    ray    each cell a Ray task on an existing cluster (`pip install 'dllm-export[ray]'`); a task
           whose worker dies is retried (`max_retries`), a task that raises is reported with its key.

The driver writes the same report either way; the cell cache on the shared path makes a re-run
resume where the last one stopped.
"""

from __future__ import annotations

import hashlib
import json
import random
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from .errors import InputError

EXECUTORS = ("local", "ray")
# Ray task options a user may set per cell (ray.remote(...).options)
_RAY_OPTIONS = {"num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "max_retries",
                "scheduling_strategy", "runtime_env", "label_selector"}


@dataclass(frozen=True)
class Cell:
    """One independent unit of a grid: a stable `key` (also its seed and its cache name) and the
    keyword arguments of the cell function (plain, picklable data)."""

    key: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CellResult:
    """What a cell gave back: `value`, or `error` (one line: exception type and message)."""

    key: str
    value: Any = None
    error: str | None = None


def seed_for(key: str) -> int:
    """The cell's seed: the first 4 bytes of sha256(key), so any process derives the same one."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")


def run_seeded(fn: Callable[[Cell], Any], cell: Cell) -> Any:
    """Seed Python's, NumPy's and torch's generators from the cell's key, then run `fn(cell)`."""
    import numpy as np
    import torch

    s = seed_for(cell.key)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)
    return fn(cell)


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


class Executor(Protocol):
    """Runs `fn` on every cell; returns one `CellResult` per cell, in the order of `cells`.
    `on_done(result)` is called as each cell finishes (in completion order), e.g. for a progress bar."""

    name: str

    def map(self, fn: Callable[[Cell], Any], cells: Sequence[Cell],
            on_done: Callable[[CellResult], None] | None = None) -> list[CellResult]: ...


class LocalExecutor:
    """Today's loop: every cell in this process, in order. A cell that raises is recorded with its
    key (the traceback is logged) and the grid goes on."""

    name = "local"

    def map(self, fn, cells, on_done=None) -> list[CellResult]:
        import logging

        out = []
        for c in cells:
            try:
                r = CellResult(c.key, value=run_seeded(fn, c))
            except Exception as e:  # noqa: BLE001 (a broken cell must not lose the others)
                logging.getLogger(__name__).error("cell %s failed:\n%s", c.key, traceback.format_exc())
                r = CellResult(c.key, error=_one_line(e))
            out.append(r)
            if on_done is not None:
                on_done(r)
        return out


def import_ray():
    """`import ray`, or a one-line InputError naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray needs Ray: pip install 'dllm-export[ray]'") from None
    return ray


def _probe(address: str | None, timeout: float = 5.0) -> None:
    """InputError unless something listens at a Ray address's host:port ("host:port" or
    "ray://host:port"; None, "auto" and "local" are this node's, which Ray finds or starts): Ray keeps retrying
    an address nothing answers at, printing a warning every 30 seconds, without end."""
    import socket

    if address in (None, "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise InputError(f"Ray address {address!r}: expected host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise InputError(f"cannot reach a Ray cluster at {address!r}: {e.strerror or e}") from None


class RayExecutor:
    """Each cell a Ray task. Connects to `address` ("auto": the cluster running on this node;
    "ray://host:10001": a remote cluster through Ray Client; None: Ray's default, which joins a
    cluster on this node or starts a local one) unless Ray is initialised already, and shuts down
    only what it started. `resources` are the task options of every cell ({"num_gpus": 1}, ...).
    A task whose worker process dies is retried up to `max_retries` times (only that cell is run
    again); a task that raises is not retried and comes back as that cell's error.

    Paths in the cells' arguments must name the same files on every node (a shared filesystem)."""

    name = "ray"

    def __init__(self, address: str | None = None, resources: dict | None = None, max_retries: int = 3) -> None:
        self.address = address
        self.resources = dict(resources or {})
        unknown = set(self.resources) - _RAY_OPTIONS
        if unknown:
            raise InputError(f"unknown --cell-resources key(s) {', '.join(sorted(unknown))} "
                             f"(Ray task options: {', '.join(sorted(_RAY_OPTIONS))})")
        self.max_retries = int(self.resources.pop("max_retries", max_retries))
        import_ray()  # fail before the grid starts, naming the extra

    def map(self, fn, cells, on_done=None) -> list[CellResult]:
        ray = import_ray()
        started = not ray.is_initialized()
        if started:
            _probe(self.address)
            try:
                ray.init(address=self.address)
            except ConnectionError as e:
                raise InputError(f"cannot reach a Ray cluster at {self.address!r}: {_one_line(e)}") from None
        try:
            task = ray.remote(run_seeded).options(max_retries=self.max_retries, retry_exceptions=False,
                                                  **self.resources)
            refs = [task.remote(fn, c) for c in cells]
            key_of = {r: c.key for r, c in zip(refs, cells)}
            done: dict = {}
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        res = CellResult(key_of[ref], value=ray.get(ref))
                    except ray.exceptions.RayTaskError as e:  # the cell raised: its own exception
                        res = CellResult(key_of[ref], error=_one_line(getattr(e, "cause", None) or e))
                    except ray.exceptions.RayError as e:  # worker died past its retries, object lost, ...
                        res = CellResult(key_of[ref], error=_one_line(e))
                    done[ref] = res
                    if on_done is not None:
                        on_done(res)
            return [done[r] for r in refs]
        finally:
            if started:
                ray.shutdown()


def get_executor(name: str = "local", address: str | None = None, resources: str | dict | None = None) -> Executor:
    """The executor named `name` (see EXECUTORS); `resources` a dict or its JSON text (ray only)."""
    if isinstance(resources, str):
        try:
            resources = json.loads(resources)
        except json.JSONDecodeError as e:
            raise InputError(f"--cell-resources is not valid JSON ({e})") from None
        if not isinstance(resources, dict):
            raise InputError('--cell-resources must be a JSON object, e.g. \'{"num_gpus": 1}\'')
    if name == "local":
        if address or resources:
            raise InputError("--address and --cell-resources apply to --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, resources=resources)
    raise InputError(f"unknown executor {name!r} (choose from {', '.join(EXECUTORS)})")


__all__ = ["Cell", "CellResult", "EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "get_executor",
           "import_ray", "run_seeded", "seed_for"]
