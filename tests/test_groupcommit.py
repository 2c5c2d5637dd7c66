"""The batched write path: same rules as the direct path, bounded queue and batches.

A writer is held still by taking its pool's only connection: it has taken a batch
and waits for a connection, so what is queued behind it stays queued for as long
as the test wants. The concurrency checks are the direct path's own, from
test_eventstore, run through the queue instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import psycopg
import pytest

from services import schema
from services.config import PoolSettings
from services.errors import (
    OperationFailure,
    OperationTimeout,
    QueueFull,
    ServiceUnavailable,
)
from services.eventstore import (
    Command,
    EventStore,
    Outcome,
    create_accounts,
    deposit,
    open_account,
    transfer,
    withdraw,
)
from services.groupcommit import GroupCommitter
from services.pool import Conn, Pool
from tests.test_eventstore import (
    ACCOUNTS,
    OPENING,
    check_invariants,
    events,
    heads,
    run_concurrently,
)


@contextmanager
def committer(
    db_url: str,
    *,
    writers: int = 1,
    batch_size: int = 100,
    queue_size: int = 1000,
    deadline_s: float = 5.0,
) -> Iterator[GroupCommitter]:
    config = PoolSettings(min_size=0, max_size=writers, acquire_timeout=10.0)
    with Pool(db_url, config, role="writers") as pool:
        gc = GroupCommitter(
            pool,
            batch_size=batch_size,
            writers=writers,
            queue_size=queue_size,
            write_deadline_s=deadline_s,
        )
        gc.start()
        try:
            yield gc
        finally:
            gc.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        gevent.sleep(0.01)


def hold_writer(gc: GroupCommitter, first: Command) -> gevent.Greenlet:
    """Submit `first` and return once the writer has it and waits for a connection.

    The caller holds the writer pool's only connection.
    """
    submitter = gevent.spawn(gc.submit, first)
    wait_until(lambda: gc.pool.stats().waiting == 1)
    return submitter


def written(conn: Conn) -> set[Any]:
    return {e.transaction_id for e in events(conn)}


# Accounts 1 to 3 open with 100 each; account 4 is opened by the script.
SCRIPT = [
    open_account(60),
    deposit(1, 50),
    withdraw(2, 100),
    withdraw(2, 1),
    transfer(1, 2, 120),
    transfer(3, 3, 5),
    transfer(2, 3, 121),
    deposit(9, 5),
    deposit(1, 0),
    transfer(2, 1, 120),
    withdraw(1, 150),
    transfer(4, 1, 60),
    withdraw(3, 100),
    withdraw(3, 1),
    deposit(3, 7),
    transfer(1, 4, 20),
]


def outcome_of(run: Callable[[Command], Outcome], cmd: Command) -> str:
    try:
        return f"ok {run(cmd).account_id}"
    except OperationFailure as exc:
        return type(exc).__name__


def state(conn: Conn) -> tuple[Any, ...]:
    """Heads and events, each event named by the script line that wrote it."""
    line = {cmd.transaction_id: n for n, cmd in enumerate(SCRIPT)}
    log = sorted(
        (e.account_id, e.version, e.event_type, e.delta, line.get(e.transaction_id))
        for e in events(conn)
    )
    return heads(conn), log


def test_batched_and_direct_paths_agree(conn: Conn, db_url: str) -> None:
    create_accounts(conn, 3, 100, batch_size=10)
    config = PoolSettings(min_size=0, max_size=1, acquire_timeout=5.0)
    with Pool(db_url, config, role="direct") as pool:
        store = EventStore(
            pool, write_deadline_s=5.0, read_deadline_s=5.0, conflict_attempts=1
        )
        direct = [outcome_of(store.execute, cmd) for cmd in SCRIPT]
    direct_state = state(conn)

    schema.reset(conn)
    create_accounts(conn, 3, 100, batch_size=10)
    with committer(db_url) as gc:
        one_by_one = [outcome_of(gc.submit, cmd) for cmd in SCRIPT]
    assert gc.stats.largest_batch == 1
    one_by_one_state = state(conn)

    # Now the whole script queued at once, so that later commands are planned
    # against heads moved by earlier ones of the same batch.
    schema.reset(conn)
    create_accounts(conn, 3, 100, batch_size=10)
    grouped = [""] * len(SCRIPT)

    def submit(n: int) -> None:
        grouped[n] = outcome_of(gc.submit, SCRIPT[n])

    with committer(db_url, batch_size=6) as gc:
        with gc.pool.connection():
            submitters = [gevent.spawn(submit, n) for n in range(len(SCRIPT))]
            wait_until(lambda: gc.pool.stats().waiting == 1)
            gevent.sleep(0.05)
        gevent.joinall(submitters, raise_error=True)
    assert gc.stats.largest_batch == 6
    grouped_state = state(conn)

    assert direct == [
        "ok 4",
        "ok 1",
        "ok 2",
        "Overdraft",
        "ok 1",
        "SameAccount",
        "Overdraft",
        "UnknownAccount",
        "InvalidAmount",
        "ok 2",
        "ok 1",
        "ok 4",
        "ok 3",
        "Overdraft",
        "ok 3",
        "ok 1",
    ]
    assert one_by_one == direct
    assert grouped == direct
    assert direct_state[0] == {1: (7, 40), 2: (4, 0), 3: (3, 7), 4: (3, 20)}
    assert one_by_one_state == direct_state
    assert grouped_state == direct_state


def test_batches_group_concurrent_commands(conn: Conn, db_url: str) -> None:
    accounts = create_accounts(conn, ACCOUNTS, OPENING, batch_size=10)

    with committer(db_url, writers=4, batch_size=50) as gc:
        results = run_concurrently(gc.submit, accounts, seed=3)

    check_invariants(conn, accounts, results)
    stats = gc.stats
    # Business rejections are planned in their batch too: every command is counted.
    assert stats.commands == len(results)
    assert 1 < stats.largest_batch <= 50
    assert stats.batches < stats.commands
    assert stats.failed_batches == 0
    assert stats.expired == 0


def test_batch_size_bounds_a_batch(conn: Conn, db_url: str) -> None:
    [account] = create_accounts(conn, 1, 100, batch_size=10)

    with committer(db_url, batch_size=3) as gc:
        with gc.pool.connection():
            first = hold_writer(gc, deposit(account, 1))
            rest = [gevent.spawn(gc.submit, deposit(account, 1)) for _ in range(10)]
            gevent.sleep(0.05)
        gevent.joinall([first, *rest], raise_error=True)

    assert (gc.stats.batches, gc.stats.largest_batch, gc.stats.commands) == (5, 3, 11)
    assert heads(conn) == {account: (12, 111)}


def test_full_queue_raises_queue_full(conn: Conn, db_url: str) -> None:
    a, b = create_accounts(conn, 2, 100, batch_size=10)
    queued, refused = deposit(b, 1), deposit(b, 2)

    with committer(db_url, queue_size=1, deadline_s=0.3) as gc:
        with gc.pool.connection():
            first = hold_writer(gc, deposit(a, 1))
            second = gevent.spawn(gc.submit, queued)
            gevent.sleep(0.02)

            started = time.monotonic()
            with pytest.raises(QueueFull):
                gc.submit(refused)
            took = time.monotonic() - started
        gevent.joinall([first, second])

    assert 0.3 <= took < 0.6
    assert isinstance(first.exception, OperationTimeout)
    assert isinstance(second.exception, OperationTimeout)
    assert gc.stats.expired == 1
    assert written(conn).isdisjoint({queued.transaction_id, refused.transaction_id})
    assert heads(conn)[b] == (1, 100)


def test_command_expired_in_queue_is_never_applied(conn: Conn, db_url: str) -> None:
    a, b = create_accounts(conn, 2, 100, batch_size=10)
    late = [deposit(b, n) for n in range(1, 6)]

    with committer(db_url, queue_size=10, deadline_s=0.3) as gc:
        with gc.pool.connection():
            first = hold_writer(gc, deposit(a, 1))
            waiting = [gevent.spawn(gc.submit, cmd) for cmd in late]
            gevent.joinall(waiting, timeout=2)
        gevent.joinall([first], timeout=2)
        gc.close()

    for submitter in waiting:
        assert isinstance(submitter.exception, OperationTimeout)
    assert gc.stats.expired == len(late)
    assert written(conn).isdisjoint(cmd.transaction_id for cmd in late)
    assert heads(conn)[b] == (1, 100)


def test_close_drains_the_queue(conn: Conn, db_url: str) -> None:
    [account] = create_accounts(conn, 1, 100, batch_size=10)
    commands = [deposit(account, n) for n in range(1, 8)]

    with committer(db_url) as gc:
        with gc.pool.connection():
            first = hold_writer(gc, commands[0])
            rest = [gevent.spawn(gc.submit, cmd) for cmd in commands[1:]]
            gevent.sleep(0.02)
            closer = gevent.spawn(gc.close)
            gevent.sleep(0.05)
            assert not closer.ready()
        closer.join(timeout=5)
        assert closer.successful()
        gevent.joinall([first, *rest], raise_error=True)

        with pytest.raises(ServiceUnavailable, match="closed"):
            gc.submit(deposit(account, 1))

    assert all(isinstance(g.value, Outcome) for g in [first, *rest])
    assert gc.stats.commands == len(commands)
    assert written(conn) >= {cmd.transaction_id for cmd in commands}
    assert heads(conn) == {account: (8, 100 + sum(range(1, 8)))}


def test_failed_batch_fails_all_its_commands_and_writer_goes_on(
    conn: Conn, db_url: str
) -> None:
    a, b = create_accounts(conn, 2, 100, batch_size=10)
    blocker = psycopg.connect(db_url)
    blocker.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (a,))

    with committer(db_url, deadline_s=1.0) as gc:
        try:
            with gc.pool.connection():
                first = hold_writer(gc, deposit(b, 1))
                # Queued together behind it, so they make one batch.
                locked = gevent.spawn(gc.submit, deposit(a, 1))
                bystander = gevent.spawn(gc.submit, deposit(b, 2))
                gevent.sleep(0.02)
            gevent.joinall([first, locked, bystander], timeout=3)
            wait_until(lambda: gc.stats.failed_batches == 1)
        finally:
            blocker.rollback()
            blocker.close()
        after = gc.submit(deposit(b, 5))

    assert isinstance(first.value, Outcome)
    assert isinstance(locked.exception, OperationTimeout)
    assert isinstance(bystander.exception, OperationTimeout)
    assert (gc.stats.batches, gc.stats.largest_batch) == (2, 1)
    assert after.account_id == b
    assert heads(conn) == {a: (1, 100), b: (3, 106)}
