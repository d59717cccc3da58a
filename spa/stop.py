"""Stopping on a signal: promptly, at any stage, leaving nothing behind.

Inside ``stopping()`` (the CLI's run) SIGTERM and SIGHUP raise ``Terminated`` and SIGINT
``KeyboardInterrupt`` in the main thread, so the run unwinds through the ``finally`` blocks
that remove temporary files and half-written outputs (``spa.files``, ``cli._save_all``).

Python runs a signal's handler only between bytecodes of the main thread: while that thread
sits in one long C call (onnxruntime builds a session for minutes on a 100k-node graph) the
handler waits for it. ``interruptible`` therefore runs such calls (they release the GIL) in
a worker thread while the main thread waits, where a signal is handled at once. The worker
cannot be cancelled: it is left running, and a process that ends while one is still inside
onnxruntime leaves through ``os._exit`` (finalizing the interpreter under it aborts, exit
134). Calls that hold the GIL (onnx's shape inference and checker, protobuf parsing) still
delay the handler by their own length: seconds at most at 100k nodes.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Callable, TypeVar

__all__ = ["Terminated", "stopping", "interruptible"]

T = TypeVar("T")

_armed = False                      # inside stopping(): interruptible() uses a worker
_exit_code: int | None = None       # 128 + the signal that stopped the run
_busy: set[threading.Thread] = set()  # workers still inside their call (an interrupted join
                                      # marks a running thread stopped: is_alive() cannot tell)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C so temporary files are removed."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame):
    global _exit_code
    if _exit_code is not None:      # already unwinding: a second signal must not cut a cleanup short
        return
    _exit_code = 128 + signum
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


@contextlib.contextmanager
def stopping():
    """While active (in the main thread), SIGTERM and SIGHUP raise ``Terminated``, SIGINT
    ``KeyboardInterrupt``, and ``interruptible`` calls leave the main thread free to take them."""
    global _armed, _exit_code
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            try:
                previous[sig] = signal.signal(sig, _handler)
            except ValueError:      # not the main thread: leave signals alone
                pass
    _armed, _exit_code = bool(previous), None
    if _armed:
        _one_heap()
    try:
        yield
    finally:
        _armed = False
        for sig, h in previous.items():
            signal.signal(sig, h)


def _one_heap():
    """glibc gives a new thread a heap (arena) of its own and keeps what is freed there; the
    workers that run onnxruntime would hold their own copies of activations apart from the main
    heap (benchmarks/big_model.py, 0.44 GiB model: peak RSS 1.90 -> 2.17 GB). One heap for every
    thread of the CLI's process; elsewhere (not glibc) nothing changes."""
    with contextlib.suppress(Exception):
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)   # M_ARENA_MAX = 1


def interruptible(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)``; inside ``stopping()`` in a worker thread, so that a signal
    stops the run while ``fn`` (a C call that releases the GIL) is still working."""
    if not _armed or threading.current_thread() is not threading.main_thread():
        return fn(*args, **kwargs)
    box: list = []

    def work():
        try:
            box.append((True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001  (raised again in the caller's thread)
            box.append((False, e))
        finally:
            _busy.discard(worker)

    worker = threading.Thread(target=work, name="spa-interruptible", daemon=True)
    _busy.add(worker)
    worker.start()
    worker.join()                   # a signal's handler raises here
    ok, value = box[0]
    if not ok:
        raise value
    return value


@atexit.register
def _leave_if_a_worker_is_busy():
    if _exit_code is not None and _busy:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(_exit_code)
