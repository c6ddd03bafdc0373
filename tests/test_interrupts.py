"""Ctrl-C inside a C library's Python callback (llama.cpp's log hook): ctypes swallows the
KeyboardInterrupt; `kept_interrupts` raises it once the C call returns."""

import ctypes
import os
import signal
import time

import pytest

from dllm_export.interrupts import kept_interrupts


def _sigint_inside_a_ctypes_callback() -> None:
    """Call a Python function through ctypes' callback trampoline, as llama.cpp's logger is, and
    deliver SIGINT while it runs."""
    def log(_):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here, inside the callback

    ctypes.CFUNCTYPE(None, ctypes.c_char_p)(log)(b"llama.cpp log line")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_ctypes_swallows_the_interrupt():
    _sigint_inside_a_ctypes_callback()  # returns normally: without the guard the Ctrl-C is lost


def test_kept_interrupts_raises_it_after_the_call():
    with pytest.raises(KeyboardInterrupt):
        with kept_interrupts():
            _sigint_inside_a_ctypes_callback()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_kept_interrupts_is_transparent_otherwise():
    with kept_interrupts():
        x = 1 + 1
    assert x == 2 and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):  # an interrupt outside a callback propagates as usual
        with kept_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
