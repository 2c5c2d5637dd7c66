"""The one place a gevent process patches the standard library.

psycopg chooses how it waits for the socket when it is imported: it is cooperative
under gevent only if `select` was patched first. Locust patches on its own import;
the tests and any other gevent process call `patch()` before anything imports
psycopg.
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


def is_patched() -> bool:
    """Tell whether gevent has patched `select` in this process."""
    from gevent import monkey

    return bool(monkey.is_module_patched("select"))


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
