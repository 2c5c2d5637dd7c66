"""A bounded PostgreSQL connection pool with the numbers a load test needs.

psycopg_pool does the pooling. This wrapper adds what the harness reads at any
moment (connections in use, waiting requests, acquire wait time, peak utilization),
a cheap test-before-acquire, per-operation statement timeouts, connection names
that show in `pg_stat_activity`, and translation of pool errors into the project's.
Under gevent (patched before psycopg was imported) the pool's threads are greenlets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from services import green, logs
from services.config import PoolSettings, mask_url
from services.errors import PoolTimeout, ServiceUnavailable, TooManyConnections

logger = logs.get("pool")

#: The connections the pools hand out: rows come back as tuples.
Conn = psycopg.Connection[TupleRow]

#: Prefix of every connection's application_name; `pg_stat_activity` and the
#: leftover-connection checks look for it.
APP_PREFIX = "cdc-load"
#: How long `open()` waits for the minimum number of connections, in seconds.
OPEN_TIMEOUT_S = 30.0
#: How long `close()` waits for borrowed connections to come back, in seconds.
CLOSE_TIMEOUT_S = 5.0
#: How long cancelling the query of an interrupted connection may take, in seconds.
CANCEL_TIMEOUT_S = 1.0


def application_name(role: str, process: str | None = None) -> str:
    """Name a connection after its role and its process: `cdc-load-<role>-<proc>`."""
    proc = process if process is not None else str(os.getpid())
    return f"{APP_PREFIX}-{role}-{proc}"[:63]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool. Utilization is connections in use over the maximum."""

    name: str
    max_size: int
    size: int
    idle: int
    in_use: int
    waiting: int
    utilization: float
    peak_in_use: int
    peak_utilization: float
    acquisitions: int
    acquire_wait_avg_ms: float
    acquire_wait_max_ms: float
    checks: int
    timeouts: int
    #: Attempts to open a connection that failed (such as "too many clients").
    connection_errors: int


class Pool:
    """A psycopg_pool `ConnectionPool` sized and named from the profile.

    Connections are in autocommit mode: each command is one statement, so an
    implicit transaction costs no extra round trip. Code that needs a transaction
    opens one with `conn.transaction()`.
    """

    def __init__(
        self,
        url: str,
        settings: PoolSettings,
        *,
        role: str,
        process: str | None = None,
        min_size: int | None = None,
        max_size: int | None = None,
    ) -> None:
        # A Locust process was patched by Locust, not by green.patch().
        green.install_wait()
        self.name = role
        self.settings = settings
        self.max_size = max_size if max_size is not None else settings.max_size
        min_size = min_size if min_size is not None else settings.min_size
        self.min_size = min(min_size, self.max_size)
        self.application_name = application_name(role, process)
        self._url = url
        self._in_use = 0
        self._peak_in_use = 0
        self._acquisitions = 0
        self._wait_total_s = 0.0
        self._wait_max_s = 0.0
        self._checks = 0
        self._timeouts = 0
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=self.min_size,
            max_size=self.max_size,
            timeout=settings.acquire_timeout,
            max_waiting=settings.max_waiting,
            max_lifetime=settings.max_lifetime,
            kwargs={"autocommit": True, "application_name": self.application_name},
            configure=self._configure,
            reset=self._reset,
            check=self._check if settings.test_before_acquire else None,
            name=self.application_name,
            open=False,
        )

    # psycopg_pool callbacks. They run in the pool's workers or in the caller.

    def _configure(self, conn: Conn) -> None:
        # Marks used by _check and by statement_timeout(); attributes on the
        # connection object, since it is the pool's own key for it.
        conn._cdc_idle_since = time.monotonic()  # type: ignore[attr-defined]
        conn._cdc_timeout_ms = None  # type: ignore[attr-defined]

    def _reset(self, conn: Conn) -> None:
        conn._cdc_idle_since = time.monotonic()  # type: ignore[attr-defined]

    def _check(self, conn: Conn) -> None:
        # A check on every acquire costs a round trip per operation (about 20% of
        # throughput here); only connections idle longer than the window get one.
        idle_since: float = getattr(conn, "_cdc_idle_since", 0.0)
        if time.monotonic() - idle_since < self.settings.idle_check_after:
            return
        self._checks += 1
        psycopg_pool.ConnectionPool.check_connection(conn)

    # Lifecycle.

    def open(self, *, wait: bool = True, timeout: float = OPEN_TIMEOUT_S) -> None:
        """Open the pool; with `wait`, block until `min_size` connections are up.

        Raise `ServiceUnavailable` if the minimum cannot be reached in `timeout`.
        """
        self._pool.open(wait=False)
        logger.info(
            "opening pool %s: min %s, max %s, on %s",
            self.application_name,
            self.min_size,
            self.max_size,
            mask_url(self._url),
        )
        if not wait:
            return
        try:
            self._pool.wait(timeout=timeout)
        except psycopg_pool.PoolTimeout as exc:
            self._pool.close(timeout=0)
            raise ServiceUnavailable(
                f"pool {self.application_name} could not open {self.min_size} "
                f"connections in {timeout:g} s on {mask_url(self._url)}"
            ) from exc

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> PoolStats:
        """Close every connection and log the final state; return that state."""
        final = self.stats()
        self._pool.close(timeout=timeout)
        logger.info(
            "closed pool %s: size %s, idle %s, peak in use %s of %s, acquisitions %s, "
            "timeouts %s",
            self.application_name,
            final.size,
            final.idle,
            final.peak_in_use,
            final.max_size,
            final.acquisitions,
            final.timeouts,
        )
        return final

    def __enter__(self) -> Pool:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Use.

    @contextmanager
    def connection(self, *, statement_timeout_s: float | None = None) -> Iterator[Conn]:
        """Borrow a connection; give it back on exit, whatever happens.

        Raise `PoolTimeout` when no connection comes within the acquire timeout or
        the queue of waiting requests is full, and `TooManyConnections` when the
        server refuses new connections. A connection that leaves the block in the
        middle of a query is closed by the pool instead of reused.
        """
        started = time.monotonic()
        try:
            conn = self._pool.getconn()
        except psycopg_pool.TooManyRequests as exc:
            self._timeouts += 1
            waiting = self.settings.max_waiting
            raise PoolTimeout(f"pool {self.name}: {waiting} requests waiting") from exc
        except psycopg_pool.PoolTimeout as exc:
            self._timeouts += 1
            limit = self.settings.acquire_timeout
            raise PoolTimeout(
                f"pool {self.name}: no connection in {limit:g} s"
            ) from exc
        except pg_errors.TooManyConnections as exc:
            raise TooManyConnections(str(exc).strip()) from exc

        waited = time.monotonic() - started
        self._acquisitions += 1
        self._wait_total_s += waited
        self._wait_max_s = max(self._wait_max_s, waited)
        self._in_use += 1
        self._peak_in_use = max(self._peak_in_use, self._in_use)
        try:
            if statement_timeout_s is not None:
                set_statement_timeout(conn, statement_timeout_s)
            yield conn
        finally:
            self._in_use -= 1
            if conn.info.transaction_status == TransactionStatus.ACTIVE:
                _cancel(conn)
            # putconn closes a connection still busy with a query (status ACTIVE)
            # rather than handing it to the next caller.
            self._pool.putconn(conn)

    @property
    def in_use(self) -> int:
        """Connections borrowed right now."""
        return self._in_use

    @property
    def utilization(self) -> float:
        """Connections in use over the pool's maximum, from 0 to 1."""
        return self._in_use / self.max_size

    def stats(self) -> PoolStats:
        """Return the pool's numbers now, peaks and totals since it was made."""
        raw = self._pool.get_stats()
        size = raw.get("pool_size", 0)
        return PoolStats(
            name=self.name,
            max_size=self.max_size,
            size=size,
            idle=raw.get("pool_available", 0),
            in_use=self._in_use,
            waiting=raw.get("requests_waiting", 0),
            utilization=self._in_use / self.max_size,
            peak_in_use=self._peak_in_use,
            peak_utilization=self._peak_in_use / self.max_size,
            acquisitions=self._acquisitions,
            acquire_wait_avg_ms=(
                1000 * self._wait_total_s / self._acquisitions
                if self._acquisitions
                else 0
            ),
            acquire_wait_max_ms=1000 * self._wait_max_s,
            checks=self._checks,
            timeouts=self._timeouts,
            connection_errors=raw.get("connections_errors", 0),
        )


def _cancel(conn: Conn) -> None:
    # Left in the middle of a query (a client deadline, a killed greenlet). Closing
    # the connection alone leaves the statement running on the server: it keeps its
    # locks and its backend, beyond max_size, and a write may still commit later.
    try:
        conn.cancel_safe(timeout=CANCEL_TIMEOUT_S)
    except psycopg.Error as exc:
        logger.warning("could not cancel an interrupted query: %s", exc)


def set_statement_timeout(conn: Conn, seconds: float) -> None:
    """Set the server-side statement timeout, skipping the round trip if it is set."""
    ms = max(1, round(seconds * 1000))
    if getattr(conn, "_cdc_timeout_ms", None) == ms:
        return
    conn.execute(f"SET statement_timeout = {ms}")
    conn._cdc_timeout_ms = ms  # type: ignore[attr-defined]
