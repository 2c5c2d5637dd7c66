"""The event store's direct path: command rules, the events contract, concurrency.

Every check reads the tables back; a command's effect is what the server holds,
not what the client was told.
"""

from __future__ import annotations

import random
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import gevent.pool
import psycopg
import pytest
from psycopg import errors as pg_errors

from services.config import PoolSettings
from services.errors import (
    Conflict,
    InvalidAmount,
    OperationFailure,
    Overdraft,
    SameAccount,
    UnknownAccount,
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
from services.pool import Conn, Pool
from services.schema import EVENT_TYPES

OPENING = 10_000
ACCOUNTS = 5
USERS = 50
COMMANDS_PER_USER = 10


@contextmanager
def open_store(
    db_url: str, *, max_size: int = 4, conflict_attempts: int = 5
) -> Iterator[EventStore]:
    config = PoolSettings(min_size=0, max_size=max_size, acquire_timeout=10.0)
    with Pool(db_url, config, role="store") as pool:
        yield EventStore(
            pool,
            write_deadline_s=5.0,
            read_deadline_s=2.0,
            conflict_attempts=conflict_attempts,
        )


def heads(conn: Conn) -> dict[int, tuple[int, int]]:
    """Each account's (version, balance)."""
    rows = conn.execute("SELECT account_id, version, balance FROM accounts").fetchall()
    return {int(r[0]): (int(r[1]), int(r[2])) for r in rows}


@dataclass(frozen=True)
class Event:
    position: int
    account_id: int
    version: int
    event_type: str
    delta: int
    transaction_id: uuid.UUID
    created_at: datetime


def events(conn: Conn) -> list[Event]:
    rows = conn.execute(
        "SELECT position, account_id, version, event_type, delta, transaction_id,"
        " created_at FROM events ORDER BY position"
    ).fetchall()
    return [Event(*r) for r in rows]


def test_open_writes_head_and_opening_event(conn: Conn, db_url: str) -> None:
    with open_store(db_url) as store:
        cmd = open_account(750)
        outcome = store.execute(cmd)

    assert heads(conn) == {outcome.account_id: (1, 750)}
    [event] = events(conn)
    assert (event.account_id, event.version) == (outcome.account_id, 1)
    assert (event.event_type, event.delta) == ("AccountOpened", 750)
    assert event.transaction_id == outcome.transaction_id == cmd.transaction_id


def test_deposit_withdraw_transfer_move_exact_amounts(conn: Conn, db_url: str) -> None:
    a, b = create_accounts(conn, 2, 1000, batch_size=10)

    with open_store(db_url) as store:
        store.execute(deposit(a, 250))
        assert heads(conn) == {a: (2, 1250), b: (1, 1000)}

        store.execute(withdraw(b, 400))
        assert heads(conn) == {a: (2, 1250), b: (2, 600)}

        cmd = transfer(a, b, 1250)
        outcome = store.execute(cmd)
        assert heads(conn) == {a: (3, 0), b: (3, 1850)}
        assert store.balance(a).balance == 0
        assert store.balance(b).version == 3
        with pytest.raises(UnknownAccount):
            store.balance(999)

    assert outcome.transaction_id == cmd.transaction_id
    assert outcome.attempts == 1
    last = events(conn)[-2:]
    assert [(e.account_id, e.version, e.event_type, e.delta) for e in last] == [
        (a, 3, "TransferDebited", -1250),
        (b, 3, "TransferCredited", 1250),
    ]
    assert {e.transaction_id for e in last} == {cmd.transaction_id}


REFUSED: list[tuple[str, Callable[[int, int], Command], type[OperationFailure]]] = [
    ("deposit zero", lambda a, b: deposit(a, 0), InvalidAmount),
    ("deposit negative", lambda a, b: deposit(a, -5), InvalidAmount),
    ("withdraw zero", lambda a, b: withdraw(a, 0), InvalidAmount),
    ("withdraw negative", lambda a, b: withdraw(a, -1), InvalidAmount),
    ("transfer zero", lambda a, b: transfer(a, b, 0), InvalidAmount),
    ("transfer negative", lambda a, b: transfer(a, b, -100), InvalidAmount),
    ("open zero", lambda a, b: open_account(0), InvalidAmount),
    ("open negative", lambda a, b: open_account(-1), InvalidAmount),
    ("transfer to itself", lambda a, b: transfer(a, a, 10), SameAccount),
    ("deposit unknown", lambda a, b: deposit(999, 10), UnknownAccount),
    ("withdraw unknown", lambda a, b: withdraw(999, 10), UnknownAccount),
    ("transfer to unknown", lambda a, b: transfer(a, 999, 10), UnknownAccount),
    ("transfer from unknown", lambda a, b: transfer(999, b, 10), UnknownAccount),
    ("withdraw too much", lambda a, b: withdraw(a, 101), Overdraft),
    ("transfer too much", lambda a, b: transfer(b, a, 51), Overdraft),
]


@pytest.mark.parametrize(
    ("make", "failure"),
    [(make, failure) for _, make, failure in REFUSED],
    ids=[name for name, _, _ in REFUSED],
)
def test_refused_command_writes_nothing(
    conn: Conn,
    db_url: str,
    make: Callable[[int, int], Command],
    failure: type[OperationFailure],
) -> None:
    [a] = create_accounts(conn, 1, 100, batch_size=10)
    [b] = create_accounts(conn, 1, 50, batch_size=10)
    before_heads, before_events = heads(conn), events(conn)

    with open_store(db_url) as store, pytest.raises(failure):
        store.execute(make(a, b))

    assert heads(conn) == before_heads
    assert events(conn) == before_events


def test_withdraw_to_exactly_zero_then_overdraft(conn: Conn, db_url: str) -> None:
    [a] = create_accounts(conn, 1, 300, batch_size=10)

    with open_store(db_url) as store:
        store.execute(withdraw(a, 300))
        with pytest.raises(Overdraft):
            store.execute(withdraw(a, 1))

    assert heads(conn) == {a: (2, 0)}
    assert len(events(conn)) == 2


def test_events_are_append_only(conn: Conn) -> None:
    create_accounts(conn, 2, 100, batch_size=10)
    before = events(conn)

    with pytest.raises(pg_errors.FeatureNotSupported, match="append-only"):
        conn.execute("UPDATE events SET delta = 0")
    with pytest.raises(pg_errors.FeatureNotSupported, match="append-only"):
        conn.execute("DELETE FROM events")

    assert events(conn) == before


CONTRACT = {
    "position": "bigint",
    "account_id": "bigint",
    "version": "integer",
    "event_type": "text",
    "delta": "bigint",
    "transaction_id": "uuid",
    "created_at": "timestamp with time zone",
}


def test_events_columns_match_the_contract(conn: Conn) -> None:
    rows = conn.execute(
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = 'events'"
    ).fetchall()

    # Other columns may be added; these are what outside tools rely on.
    found = {r[0]: (r[1], r[2]) for r in rows if r[0] in CONTRACT}
    assert found == {name: (kind, "NO") for name, kind in CONTRACT.items()}


def test_events_refuse_duplicate_versions_and_unknown_types(conn: Conn) -> None:
    [a] = create_accounts(conn, 1, 100, batch_size=10)
    insert = (
        "INSERT INTO events (account_id, version, event_type, delta, transaction_id)"
        " VALUES (%s, %s, %s, %s, gen_random_uuid())"
    )

    with pytest.raises(pg_errors.UniqueViolation):
        conn.execute(insert, (a, 1, "MoneyDeposited", 5))
    with pytest.raises(pg_errors.CheckViolation):
        conn.execute(insert, (a, 2, "MoneyStolen", 5))
    with pytest.raises(pg_errors.CheckViolation):
        conn.execute(insert, (a, 0, "MoneyDeposited", 5))

    assert len(events(conn)) == 1


SIGN = {
    "AccountOpened": 1,
    "MoneyDeposited": 1,
    "MoneyWithdrawn": -1,
    "TransferDebited": -1,
    "TransferCredited": 1,
}


def test_events_follow_the_contract(conn: Conn, db_url: str) -> None:
    a, b = create_accounts(conn, 2, 500, batch_size=10)
    with open_store(db_url) as store:
        c = store.execute(open_account(40)).account_id
        for cmd in [
            deposit(a, 70),
            transfer(a, b, 300),
            withdraw(b, 20),
            transfer(b, c, 5),
            deposit(c, 1),
        ]:
            store.execute(cmd)
    log = events(conn)

    positions = [e.position for e in log]
    assert positions == sorted(positions)
    assert len(set(positions)) == len(positions)

    for account in (a, b, c):
        versions = [e.version for e in log if e.account_id == account]
        assert versions == list(range(1, len(versions) + 1))
    assert [e.event_type for e in log if e.version == 1] == ["AccountOpened"] * 3

    assert {e.event_type for e in log} == set(EVENT_TYPES)
    for e in log:
        assert e.delta != 0 and (e.delta > 0) == (SIGN[e.event_type] > 0)
        assert e.created_at.tzinfo is not None

    by_tx = Counter(e.transaction_id for e in log)
    for e in log:
        shared = by_tx[e.transaction_id]
        assert shared == (2 if e.event_type.startswith("Transfer") else 1)
    pairs = [e for e in log if e.event_type.startswith("Transfer")]
    for debit, credit in zip(pairs[::2], pairs[1::2], strict=True):
        assert debit.transaction_id == credit.transaction_id
        assert debit.delta == -credit.delta

    assert heads(conn) == {
        a: (3, 270),
        b: (4, 775),
        c: (3, 46),
    }


@dataclass
class Result:
    cmd: Command
    outcome: Outcome | None = None
    failure: OperationFailure | None = None


def random_commands(accounts: list[int], rng: random.Random) -> list[Command]:
    commands: list[Command] = []
    for _ in range(COMMANDS_PER_USER):
        roll = rng.random()
        amount = rng.randint(1, 3000)
        if roll < 0.6:
            src, dst = rng.sample(accounts, 2)
            commands.append(transfer(src, dst, amount))
        elif roll < 0.85:
            commands.append(withdraw(rng.choice(accounts), amount))
        else:
            commands.append(deposit(rng.choice(accounts), amount))
    return commands


def run_concurrently(
    run: Callable[[Command], Outcome], accounts: list[int], seed: int
) -> list[Result]:
    """Many greenlets each run their own commands; every result is kept."""
    rng = random.Random(seed)
    plans = [random_commands(accounts, rng) for _ in range(USERS)]
    results: list[Result] = []

    def user(commands: list[Command]) -> None:
        for cmd in commands:
            result = Result(cmd)
            results.append(result)
            try:
                result.outcome = run(cmd)
            except (Overdraft, Conflict) as exc:
                result.failure = exc

    group = gevent.pool.Group()
    for commands in plans:
        group.spawn(user, commands)
    group.join(raise_error=True)
    return results


def check_invariants(conn: Conn, accounts: list[int], results: list[Result]) -> None:
    """Assert what must hold after any concurrent mix of commands."""
    assert len(results) == USERS * COMMANDS_PER_USER
    assert all((r.outcome is None) != (r.failure is None) for r in results)
    log = events(conn)
    now = heads(conn)

    # Every success is in the log with its events, and no failure left any.
    written = Counter(e.transaction_id for e in log)
    for r in results:
        expected = 0
        if r.outcome is not None:
            expected = 2 if r.cmd.kind == "transfer" else 1
        assert written[r.cmd.transaction_id] == expected, r
    successes = [r for r in results if r.outcome is not None]
    moves = sum(2 if r.cmd.kind == "transfer" else 1 for r in successes)
    assert len(log) == len(accounts) + moves

    for account in accounts:
        own = [e for e in log if e.account_id == account]
        own.sort(key=lambda e: e.version)
        assert [e.version for e in own] == list(range(1, len(own) + 1))
        running = 0
        for e in own:
            running += e.delta
            assert running >= 0, f"account {account} went to {running}"
        assert now[account] == (len(own), running)

    deposits = sum(r.cmd.amount for r in successes if r.cmd.kind == "deposit")
    withdrawals = sum(r.cmd.amount for r in successes if r.cmd.kind == "withdraw")
    total = sum(balance for _, balance in now.values())
    assert total == OPENING * len(accounts) + deposits - withdrawals


def test_concurrent_commands_keep_invariants(conn: Conn, db_url: str) -> None:
    accounts = create_accounts(conn, ACCOUNTS, OPENING, batch_size=10)

    with open_store(db_url, max_size=10) as store:
        results = run_concurrently(store.execute, accounts, seed=7)

    check_invariants(conn, accounts, results)
    outcomes = [r.outcome for r in results if r.outcome is not None]
    retried = sum(o.attempts - 1 for o in outcomes)
    assert store.conflicts_retried > 0
    assert store.conflicts_retried >= retried > 0
    assert any(isinstance(r.failure, Overdraft) for r in results)


def test_single_attempt_reports_conflicts(conn: Conn, db_url: str) -> None:
    accounts = create_accounts(conn, ACCOUNTS, OPENING, batch_size=10)

    with open_store(db_url, max_size=10, conflict_attempts=1) as store:
        results = run_concurrently(store.execute, accounts, seed=11)

    check_invariants(conn, accounts, results)
    conflicts = [r for r in results if isinstance(r.failure, Conflict)]
    assert conflicts
    assert isinstance(conflicts[0].failure, Conflict)
    assert isinstance(
        conflicts[0].failure.__cause__, psycopg.errors.SerializationFailure
    )
    assert store.conflicts_retried == 0
    assert all(r.outcome.attempts == 1 for r in results if r.outcome is not None)
