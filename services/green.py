"""The one place a gevent process patches the standard library.

psycopg chooses how it waits for the socket when it is imported: it is cooperative
under gevent only if `select` was patched first. Locust patches on its own import;
the tests and any other gevent process call `patch()` before anything imports
psycopg. Once patched, psycopg's wait is replaced by a cheaper gevent-native one
(`install_wait`, called by `patch()` and by every `Pool`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any


def patch() -> None:
    """Monkey-patch the standard library for gevent, or fail if it is too late.

    Raise `RuntimeError` if psycopg was imported before the patch: its connections
    would then block the whole process instead of yielding to other greenlets.
    """
    from gevent import monkey

    if monkey.is_module_patched("select"):
        return
    if "psycopg" in sys.modules:
        raise RuntimeError("psycopg was imported before gevent patched select")
    monkey.patch_all()
    install_wait()


_PATCHED = False


def is_patched() -> bool:
    """Tell whether gevent has patched `select` in this process."""
    global _PATCHED
    # Patching is for good: once seen, the hot paths need not ask gevent again.
    if not _PATCHED:
        from gevent import monkey

        _PATCHED = bool(monkey.is_module_patched("select"))
    return _PATCHED


class _Tick(Exception):
    """A wait's interval passed with the socket not ready."""


_INSTALLED = False


def install_wait() -> None:
    """Make psycopg wait on one gevent watcher per wait, in a gevent process.

    Under gevent psycopg waits with the patched `poll()`: a poll object, a watcher
    per registered socket and a result list, made for every wait. gevent's
    `wait_read` and `wait_write` make one watcher. Counted with callgrind: 17%
    fewer instructions per `SELECT 1` (20 greenlets), 10% fewer per transfer on
    the direct path's two statements (scripts/bare.py, 10 greenlets). psycopg
    looks the function up in `psycopg.waiting` at every wait, so replacing it
    there reaches every connection. A no-op in a process without gevent's patch.
    """
    global _INSTALLED
    if _INSTALLED or not is_patched():
        return
    import psycopg.waiting

    psycopg.waiting.wait = _make_wait()
    _INSTALLED = True


def _make_wait() -> Any:
    import os
    import time

    from gevent.socket import wait_read, wait_readwrite, wait_write
    from psycopg import errors
    from psycopg.waiting import Ready, Wait

    waits = {Wait.R: wait_read, Wait.W: wait_write, Wait.RW: wait_readwrite}
    # A watcher does not tell which of read or write fired. Saying both is safe:
    # libpq's non-blocking calls do nothing when the socket is not ready.
    ready_of = {Wait.R: Ready.R, Wait.W: Ready.W, Wait.RW: Ready.RW}

    def wait(
        gen: Any, fileno: int, interval: float = 0.0, timeout: float | None = None
    ) -> Any:
        # The contract of psycopg.waiting.wait: drive `gen`, waking it at least
        # every `interval` with READY_NONE, and give up after `timeout`.
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            s = next(gen)
            while True:
                t = interval
                if deadline is not None:
                    t = max(0.0, min(interval, deadline - time.monotonic()))
                try:
                    waits[s](fileno, timeout=t, timeout_exc=_Tick)
                    ready = ready_of[s]
                except _Tick:
                    # A socket closed under the wait never becomes ready; poll()
                    # would say so, a watcher does not: look at it on each tick.
                    try:
                        os.fstat(fileno)
                    except OSError as exc:
                        raise errors.OperationalError(
                            "connection socket closed"
                        ) from exc
                    ready = Ready.NONE
                s = gen.send(ready)
                if deadline is not None and time.monotonic() >= deadline:
                    raise errors._WaitTimeout("wait timeout expired")
        except StopIteration as stop:
            return stop.value

    return wait


#: Extra time the client allows past the server's statement timeout, in seconds, so
#: that the server normally cancels first and the connection stays usable; the
#: client deadline is the backstop for a server or network that stops answering.
CLIENT_MARGIN_S = 0.25


def deadline(seconds: float, exc: BaseException) -> Any:
    """Return a context that raises `exc` in this greenlet after `seconds`.

    Under gevent this is a `gevent.Timeout`; in a process without gevent there is no
    way to interrupt a blocked call from inside, so it returns a no-op context and
    only the server-side statement timeout applies.
    """
    if not is_patched():
        return contextlib.nullcontext()
    import gevent

    return gevent.Timeout(seconds + CLIENT_MARGIN_S, exc)


# The primitives the hot paths wait on. The standard library's, once patched, are
# built from gevent locks and conditions in pure Python and cost several times
# gevent's own (a semaphore contended by 50 greenlets spent the CPU switching);
# so a gevent process gets gevent's, and a plain process the standard library's.


def semaphore(value: int) -> Any:
    """A bounded semaphore: `acquire(timeout=None)` and `release()`."""
    if is_patched():
        from gevent.lock import BoundedSemaphore

        return BoundedSemaphore(value)
    import threading

    return threading.BoundedSemaphore(value)


def event() -> Any:
    """An event: `set()`, `is_set()`, `wait(timeout)` returning whether it is set."""
    if is_patched():
        from gevent.event import Event

        return Event()
    import threading

    return threading.Event()


def queue(maxsize: int) -> Any:
    """A bounded FIFO queue with `put(timeout)`, `get()` and `get_nowait()`.

    Raise the standard library's `queue.Full` and `queue.Empty` in both cases
    (gevent's queue uses the same exception classes).
    """
    if is_patched():
        from gevent.queue import Queue

        return Queue(maxsize)
    import queue as std_queue

    return std_queue.Queue(maxsize)
