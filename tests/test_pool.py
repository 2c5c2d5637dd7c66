"""The bounded pool on a real server, under real greenlets.

Connections are counted where they matter, in `pg_stat_activity`, by the pool's
application_name; waits are measured with the monotonic clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.pool
import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg.pq import TransactionStatus

from services import green
from services.config import PoolSettings
from services.errors import OperationTimeout, PoolTimeout
from services.eventstore import EventStore, create_accounts, deposit, translate
from services.pool import Conn, Pool, PoolStats, application_name, set_statement_timeout
from tests.conftest import cdc_load_connections

BUSY = "another command is already in progress"


def settings(**changes: Any) -> PoolSettings:
    base = PoolSettings(min_size=0, max_size=4, acquire_timeout=2.0)
    return dataclasses.replace(base, **changes)


def dbname(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


def server_states(url: str, name: str) -> list[str]:
    """States of the server's connections named `name` in the test database."""
    rows = cdc_load_connections(url, dbname(url))
    return [str(state) for app, state in rows if app == name]


def wait_until(predicate: Any, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        gevent.sleep(0.02)
    return bool(predicate())


def backend_pid(conn: Conn) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert row is not None
    return int(row[0])


def test_application_name_names_role_and_process() -> None:
    assert application_name("users", "w3") == "cdc-load-users-w3"
    assert application_name("writers").startswith("cdc-load-writers-")
    assert len(application_name("r" * 100)) == 63


def test_never_more_than_max_size_on_the_server(db_url: str) -> None:
    samples: list[PoolStats] = []
    counts: list[int] = []
    done = False

    with Pool(db_url, settings(max_size=4), role="bounded", process="t") as pool:
        assert pool.application_name == "cdc-load-bounded-t"

        def user() -> None:
            for _ in range(2):
                with pool.connection() as c:
                    c.execute("SELECT pg_sleep(0.05)")

        def monitor() -> None:
            while not done:
                samples.append(pool.stats())
                counts.append(len(server_states(db_url, pool.application_name)))
                gevent.sleep(0.02)

        watcher = gevent.spawn(monitor)
        users = gevent.pool.Group()
        for _ in range(30):
            users.spawn(user)
        users.join(raise_error=True)
        done = True
        watcher.join(timeout=2)
        final = pool.stats()

    assert max(counts) == 4
    assert max(s.size for s in samples) == 4
    assert max(s.in_use for s in samples) == 4
    assert max(s.utilization for s in samples) == 1.0
    assert max(s.waiting for s in samples) > 0
    assert final.acquisitions == 60
    assert final.peak_in_use == 4
    assert final.peak_utilization == 1.0
    assert final.acquire_wait_max_ms > 50
    assert 0 < final.acquire_wait_avg_ms <= final.acquire_wait_max_ms
    assert final.in_use == 0
    assert final.timeouts == 0


def test_acquire_timeout_raises_promptly(db_url: str) -> None:
    config = settings(max_size=1, acquire_timeout=0.2)
    with Pool(db_url, config, role="timeout") as pool, pool.connection():
        started = time.monotonic()
        with (
            pytest.raises(PoolTimeout, match=r"no connection in 0\.2 s"),
            pool.connection(),
        ):
            pass
        waited = time.monotonic() - started
        assert pool.stats().timeouts == 1

    assert 0.18 <= waited < 0.6


def test_max_waiting_exceeded_fails_at_once(db_url: str) -> None:
    config = settings(max_size=1, max_waiting=2, acquire_timeout=5.0)
    served: list[int] = []

    def waiter() -> None:
        with pool.connection() as c:
            served.append(backend_pid(c))

    with Pool(db_url, config, role="waiting") as pool:
        with pool.connection():
            waiters = [gevent.spawn(waiter) for _ in range(2)]
            assert wait_until(lambda: pool.stats().waiting == 2)

            started = time.monotonic()
            with (
                pytest.raises(PoolTimeout, match="2 requests waiting"),
                pool.connection(),
            ):
                pass
            refused_in = time.monotonic() - started

        gevent.joinall(waiters, timeout=2, raise_error=True)
        stats = pool.stats()

    assert refused_in < 0.1
    assert len(served) == 2
    assert stats.timeouts == 1
    assert stats.acquisitions == 3


def sleep_on(pool: Pool) -> None:
    with pool.connection() as c:
        c.execute("SELECT pg_sleep(5)")


def interrupt_with_timeout(pool: Pool) -> None:
    with pytest.raises(gevent.Timeout), gevent.Timeout(0.2):
        sleep_on(pool)


def interrupt_with_kill(pool: Pool) -> None:
    sleeper = gevent.spawn(sleep_on, pool)
    gevent.sleep(0.2)
    sleeper.kill(timeout=2)
    assert sleeper.dead
    assert isinstance(sleeper.value, gevent.GreenletExit)


@pytest.mark.parametrize("interrupt", [interrupt_with_timeout, interrupt_with_kill])
def test_interrupted_connection_is_not_handed_out_busy(
    db_url: str,
    caplog: pytest.LogCaptureFixture,
    interrupt: Callable[[Pool], None],
) -> None:
    config = settings(min_size=1, max_size=1)
    caplog.set_level(logging.DEBUG)

    with Pool(db_url, config, role="interrupt") as pool:
        interrupt(pool)

        started = time.monotonic()
        for n in range(5):
            with pool.connection() as c:
                assert c.execute("SELECT %s::int", (n,)).fetchone() == (n,)
                assert c.info.transaction_status == TransactionStatus.IDLE
        took = time.monotonic() - started

        # The interrupted pg_sleep must not go on running on the server: it would
        # hold a connection beyond max_size for the rest of its 5 s.
        name = pool.application_name
        assert wait_until(lambda: server_states(db_url, name) == ["idle"], 1.5)

    assert took < 1.0
    assert BUSY not in caplog.text


def test_check_skipped_for_recently_used_connections(db_url: str) -> None:
    recent = settings(min_size=2, max_size=2, idle_check_after=60.0)
    always = settings(min_size=2, max_size=2, idle_check_after=0.0)

    with Pool(db_url, recent, role="recent") as pool:
        for _ in range(20):
            with pool.connection() as c:
                c.execute("SELECT 1")
        assert pool.stats().checks == 0

    with Pool(db_url, always, role="always") as pool:
        for _ in range(20):
            with pool.connection() as c:
                c.execute("SELECT 1")
        assert pool.stats().checks == 20


def terminate(url: str, pid: int) -> None:
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

        def gone() -> bool:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            return row is not None and row[0] == 0

        assert wait_until(gone)


def test_connection_killed_while_idle_is_replaced(db_url: str) -> None:
    config = settings(min_size=1, max_size=1, idle_check_after=0.0)

    with Pool(db_url, config, role="replaced") as pool:
        with pool.connection() as c:
            killed = backend_pid(c)
        terminate(db_url, killed)

        with pool.connection() as c:
            replacement = backend_pid(c)
        stats = pool.stats()

    assert replacement != killed
    assert stats.checks >= 3  # first use, the failed check, the replacement


def test_connection_killed_while_idle_fails_without_check(db_url: str) -> None:
    # The contrast to the test above: without the check the dead one is handed out.
    config = settings(min_size=1, max_size=1, test_before_acquire=False)

    with Pool(db_url, config, role="unchecked") as pool:
        with pool.connection() as c:
            killed = backend_pid(c)
        terminate(db_url, killed)

        with pytest.raises(psycopg.OperationalError), pool.connection() as c:
            c.execute("SELECT 1")
        with pool.connection() as c:
            assert backend_pid(c) != killed
        assert pool.stats().checks == 0


def test_psycopg_is_cooperative_under_gevent(db_url: str) -> None:
    assert green.is_patched()
    with Pool(db_url, settings(min_size=2, max_size=2), role="coop") as pool:

        def nap() -> None:
            with pool.connection() as c:
                c.execute("SELECT pg_sleep(0.3)")

        started = time.monotonic()
        gevent.joinall([gevent.spawn(nap), gevent.spawn(nap)], raise_error=True)
        took = time.monotonic() - started

    assert 0.3 <= took < 0.5


def test_psycopg_waits_with_the_gevent_watcher_wait() -> None:
    import psycopg.waiting

    # Installed by green.patch(); the name tells it from psycopg's own functions.
    assert psycopg.waiting.wait.__module__ == "services.green"


def test_socket_closed_under_a_wait_fails_instead_of_hanging(db_url: str) -> None:
    c = psycopg.connect(db_url, autocommit=True)
    try:

        def close_soon() -> None:
            gevent.sleep(0.2)
            # The descriptor itself, behind libpq's back: poll() would report
            # it invalid; a watcher never fires, so the wait must look.
            os.close(c.fileno())

        closer = gevent.spawn(close_soon)
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT pg_sleep(5)")
        took = time.monotonic() - started
        closer.join()
    finally:
        with contextlib.suppress(Exception):
            c.close()

    assert took < 1.0


def test_wait_gives_up_after_its_timeout(db_url: str) -> None:
    import psycopg.waiting
    from psycopg import generators

    c = psycopg.connect(db_url, autocommit=True)
    try:
        c.pgconn.send_query(b"SELECT pg_sleep(2)")
        started = time.monotonic()
        with pytest.raises(psycopg.errors._WaitTimeout):
            psycopg.waiting.wait(
                generators.fetch_many(c.pgconn), c.pgconn.socket, 0.1, 0.3
            )
        took = time.monotonic() - started
    finally:
        c.close()

    assert 0.3 <= took < 0.6


def test_statement_timeout_is_set_per_connection(db_url: str) -> None:
    with Pool(db_url, settings(max_size=1), role="stmt") as pool:
        with pool.connection(statement_timeout_s=0.2) as c:
            assert c.execute("SHOW statement_timeout").fetchone() == ("200ms",)

            started = time.monotonic()
            with pytest.raises(pg_errors.QueryCanceled) as caught:
                c.execute("SELECT pg_sleep(2)")
            took = time.monotonic() - started
            assert c.execute("SELECT 1").fetchone() == (1,)

        # The same connection keeps it; another timeout replaces it.
        with pool.connection() as c:
            assert c.execute("SHOW statement_timeout").fetchone() == ("200ms",)
        with pool.connection(statement_timeout_s=1.5) as c:
            assert c.execute("SHOW statement_timeout").fetchone() == ("1500ms",)

    assert 0.2 <= took < 1.0
    assert isinstance(translate(caught.value), OperationTimeout)


def lock_account(url: str, account_id: int) -> psycopg.Connection[Any]:
    """Hold the row lock of an account in an open transaction; the caller ends it."""
    blocker = psycopg.connect(url)
    blocker.execute(
        "SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (account_id,)
    )
    return blocker


def event_count(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row is not None
    return int(row[0])


def test_store_translates_server_statement_timeout(conn: Conn, db_url: str) -> None:
    [account] = create_accounts(conn, 1, 1000, batch_size=10)
    before = event_count(conn)

    with Pool(db_url, settings(max_size=1), role="srvtimeout") as pool:
        store = EventStore(
            pool, write_deadline_s=0.3, read_deadline_s=0.3, conflict_attempts=1
        )
        blocker = lock_account(db_url, account)
        try:
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="statement timeout") as caught:
                store.execute(deposit(account, 10))
            took = time.monotonic() - started
        finally:
            blocker.rollback()
            blocker.close()
        assert store.balance(account).balance == 1000

    # The server cancelled it before the client margin ran out.
    assert 0.3 <= took < 0.3 + green.CLIENT_MARGIN_S
    assert isinstance(caught.value.__cause__, pg_errors.QueryCanceled)
    assert event_count(conn) == before


def test_client_deadline_fires_when_server_does_not_answer(
    conn: Conn, db_url: str
) -> None:
    [account] = create_accounts(conn, 1, 1000, batch_size=10)
    before = event_count(conn)

    with Pool(db_url, settings(max_size=1), role="silent") as pool:
        store = EventStore(
            pool, write_deadline_s=0.3, read_deadline_s=0.3, conflict_attempts=1
        )
        # The pool believes the timeout is set; the server has none, so only the
        # client deadline can end a statement that waits for ever.
        with pool.connection() as c:
            set_statement_timeout(c, 0.3)
            c.execute("SET statement_timeout = 0")

        blocker = lock_account(db_url, account)
        try:
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="deadline") as caught:
                store.execute(deposit(account, 10))
            took = time.monotonic() - started
            gevent.sleep(0.2)
        finally:
            blocker.rollback()
            blocker.close()

        # Had the blocked statement gone on running, it would commit now.
        gevent.sleep(0.2)
        assert store.balance(account).balance == 1000

    assert 0.3 + green.CLIENT_MARGIN_S <= took < 1.0
    assert caught.value.__cause__ is None
    assert event_count(conn) == before
