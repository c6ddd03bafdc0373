"""Ctrl-C across C libraries that call back into Python.

llama.cpp logs through a Python callback (llama-cpp-python installs it at import). A SIGINT whose
handler runs inside that callback raises KeyboardInterrupt there, and ctypes swallows it with an
"Exception ignored ... Traceback" on stderr: the run would go on and finish an artifact the user
cancelled. `kept_interrupts` holds SIGINT over such calls and raises it once they return.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def kept_interrupts() -> Iterator[None]:
    """Run the block (short C calls) with SIGINT noted instead of raised, and raise
    KeyboardInterrupt when it ends if one came. A no-op off the main thread or where SIGINT is not
    the default handler's (ignored, or someone else's)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, `timeout`, `docker stop`) raised as an interrupt, so that every
    writer's cleanup that runs on Ctrl-C runs on it too."""


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` instead of killing the process outright (which
    would leave temp folders behind). A no-op off the main thread or where SIGTERM has a handler."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
