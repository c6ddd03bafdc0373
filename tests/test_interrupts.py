"""Ctrl-C inside a C library's Python callback (llama.cpp's log hook): ctypes swallows the exception
a signal handler raises there; `kept_interrupts` notes the SIGINT and raises it once the C call
returns. Signals go to the main thread itself (pthread_kill), so each lands where the test says."""

import ctypes
import signal
import threading
import time

import pytest

from dllm_export.interrupts import kept_interrupts


def _sigint_inside_a_ctypes_callback() -> None:
    """Call a Python function through ctypes' callback trampoline, as llama.cpp's logger is, and
    deliver SIGINT to this (the main) thread while it runs; the handler runs before it returns."""
    def log(_):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        for _ in range(20):  # bytecode boundaries: the Python-level handler runs here, inside the callback
            time.sleep(0.001)

    ctypes.CFUNCTYPE(None, ctypes.c_char_p)(log)(b"llama.cpp log line")


class _Raised(Exception):
    pass


@pytest.fixture(autouse=True)
def _default_sigint():
    """Python's own SIGINT handler for each test: a suite started in the background (`cmd &`) starts
    with SIGINT ignored, and `kept_interrupts` rightly leaves an ignored SIGINT alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctypes_swallows_what_a_handler_raises_in_a_callback():
    def raise_(signum, frame):
        raise _Raised  # what the default handler does with KeyboardInterrupt (not raised here: pytest would stop)

    previous = signal.signal(signal.SIGINT, raise_)
    try:
        _sigint_inside_a_ctypes_callback()  # returns normally: the exception is lost
    finally:
        signal.signal(signal.SIGINT, previous)


def test_kept_interrupts_raises_it_after_the_call():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        with kept_interrupts():
            _sigint_inside_a_ctypes_callback()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_kept_interrupts_is_transparent_otherwise():
    with kept_interrupts():
        x = 1 + 1
    assert x == 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # an interrupt outside a callback is raised at the block's end
        with kept_interrupts():
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.01)
