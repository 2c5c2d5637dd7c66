"""Each profile key changes what the code does, shown with two values of the key.

test_config shows that every key is parsed and overridable; these tests show that
the value reaches the object the project builds from it (the harness, the consumer,
setup, the Locust hooks, the CDC feed, the thresholds) and changes what it does, on
the real servers. Each test sets the key through the profile loader, never on the
object it reaches, so that a key the code stopped reading fails here.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import psycopg
import pytest
from locust.argument_parser import get_parser
from locust.env import Environment
from locust.event import Events
from locust.user.task import DefaultTaskSet

from cdc_users import hooks, users
from cdc_users.cdcfeed import CdcFeed, PropagationLate
from cdc_users.harness import Harness
from cdc_users.users import AccountUser
from services import cache, green, setup
from services.config import BACKLOG_WARN_BYTES, Profile
from services.consumer import Consumer
from services.errors import OperationTimeout, QueueFull
from services.eventstore import create_accounts, deposit
from services.pool import Conn, Pool
from services.thresholds import Verdict, evaluate
from tests.conftest import ROOT, make_profile, unique
from tests.pipeline import Stack
from tests.test_groupcommit import hold_writer
from tests.test_pool import backend_pid, lock_account

#: A lifetime short enough to pass within a test, in seconds. psycopg_pool expires a
#: connection between 95% and 100% of it, and only when the connection comes back.
SHORT_LIFETIME_S = 0.25
#: How long a source transaction waits before the consumer reads it, in seconds.
APPLY_DELAY_S = 0.3
#: Payload of a logical message the consumer never confirms, in bytes: well above
#: the lower warning limit below, far below the default one.
UNCONFIRMED_BYTES = 200_000


def profile_with(db_url: str, redis_url: str, **keys: Any) -> Profile:
    """The optimized profile on the test servers with dotted `keys` changed.

    The users' pool opens one connection, not the profile's twenty: these tests
    borrow one or two, and opening twenty costs time on a busy machine.
    """
    return make_profile(db_url, redis_url, **{"database.pool.min_size": 1, **keys})


@contextmanager
def started_harness(conn: Conn, profile: Profile) -> Iterator[Harness]:
    """A harness as a Locust process starts it, on two accounts of its own."""
    create_accounts(conn, 2, 1000, batch_size=10)
    harness = Harness(profile, budget=1000, process="keys")
    harness.start()
    try:
        yield harness
    finally:
        harness.close()


@contextmanager
def blocked_table(url: str, table: str) -> Iterator[None]:
    """Hold a lock on `table` that blocks even reads, until the block ends."""
    blocker = psycopg.connect(url)
    try:
        blocker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        blocker.rollback()
        blocker.close()


# Pools: max_lifetime of each of the three, as the harness and consumer build them.

POOLS = ("database.pool", "event_store.pool", "projection_store.pool")


@contextmanager
def opened_pool(profile: Profile, section: str) -> Iterator[Pool]:
    """Open the pool the project builds from `section`, and only that one.

    The users' and writers' pools are the harness's, the projection pool the
    consumer's; neither is started, so no other connection or thread runs.
    """
    if section == "projection_store.pool":
        consumer = Consumer(profile, process="lifetime")
        pool: Pool | None = consumer.pool
        close_redis: Callable[[], None] = consumer.redis.close
    else:
        harness = Harness(profile, budget=1, process="lifetime")
        pool = harness.writer_pool if section == "event_store.pool" else harness.pool
        close_redis = harness.redis.close
    assert pool is not None
    pool.open()
    try:
        yield pool
    finally:
        pool.close()
        close_redis()


@pytest.mark.parametrize("section", POOLS)
@pytest.mark.parametrize(
    ("lifetime_s", "replaced"), [(SHORT_LIFETIME_S, True), (3600.0, False)]
)
def test_max_lifetime_replaces_a_connection_that_outlived_it(
    db_url: str, redis_url: str, section: str, lifetime_s: float, replaced: bool
) -> None:
    profile = profile_with(
        db_url,
        redis_url,
        **{
            "event_store.write_path": "batched",
            f"{section}.min_size": 1,
            f"{section}.max_size": 1,
            f"{section}.max_lifetime": lifetime_s,
        },
    )
    with opened_pool(profile, section) as pool:
        with pool.connection() as c:
            first = backend_pid(c)
            gevent.sleep(SHORT_LIFETIME_S + 0.1)
        # One connection at most: the next borrower gets this one back, or the
        # pool's replacement for it.
        with pool.connection() as c:
            second = backend_pid(c)

    assert (first != second) is replaced


# Workload: the group-commit queue, setup, the task mix and the spawn rate.


@pytest.mark.parametrize("buffer_size", [1, 4])
def test_channel_buffer_size_bounds_the_group_commit_queue(
    conn: Conn, db_url: str, redis_url: str, buffer_size: int
) -> None:
    profile = profile_with(
        db_url,
        redis_url,
        **{
            "event_store.write_path": "batched",
            "event_store.pool.min_size": 0,
            "event_store.pool.max_size": 1,
            "event_store.batch_processor_count": 1,
            "workload.channel_buffer_size": buffer_size,
            "deadlines.write": 0.3,
        },
    )
    with started_harness(conn, profile) as harness:
        a, b = harness.accounts
        assert harness.committer is not None and harness.writer_pool is not None
        # The only writer takes the first command and waits for the connection
        # held here, so everything after it stays in the queue.
        with harness.writer_pool.connection():
            first = hold_writer(harness.committer, deposit(a, 1))
            queued = [
                gevent.spawn(harness.write, deposit(b, 1)) for _ in range(buffer_size)
            ]
            gevent.sleep(0.05)
            started = time.monotonic()
            with pytest.raises(QueueFull):
                harness.write(deposit(b, 2))
            took = time.monotonic() - started
        gevent.joinall([first, *queued], timeout=5)

    # Every queued command got into the queue (then passed its deadline there);
    # the one after them waited the write deadline for room and was refused.
    assert [type(g.exception) for g in queued] == [OperationTimeout] * buffer_size
    assert 0.3 <= took < 0.3 + green.CLIENT_MARGIN_S


def opened_accounts(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT count(*), count(DISTINCT txid), min(delta), max(delta) FROM events"
        " WHERE event_type = 'AccountOpened'"
    ).fetchall()


@pytest.mark.parametrize(("batch_size", "transactions"), [(3, 3), (2, 4), (500, 1)])
def test_setup_batch_size_sets_accounts_opened_per_transaction(
    conn: Conn, db_url: str, redis_url: str, batch_size: int, transactions: int
) -> None:
    profile = profile_with(
        db_url,
        redis_url,
        **{"workload.account_count": 7, "workload.setup_batch_size": batch_size},
    )
    assert len(setup.prepare(profile)) == 7

    # One statement, so one database transaction, per batch.
    [(count, txids, _, _)] = opened_accounts(conn)
    assert (count, txids) == (7, transactions)
    assert transactions == math.ceil(7 / batch_size)


@pytest.mark.parametrize("balance", [1234, 99])
def test_opening_balance_is_what_setup_gives_each_account(
    conn: Conn, db_url: str, redis_url: str, balance: int
) -> None:
    profile = profile_with(
        db_url,
        redis_url,
        **{"workload.account_count": 5, "workload.opening_balance": balance},
    )
    setup.prepare(profile)

    [(count, _, low, high)] = opened_accounts(conn)
    assert (count, low, high) == (5, balance, balance)
    heads = conn.execute("SELECT DISTINCT balance FROM accounts").fetchall()
    assert heads == [(balance,)]


@pytest.fixture
def user_class_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Put back the tasks and pace that `users.configure` sets on the class."""
    monkeypatch.setattr(AccountUser, "tasks", AccountUser.tasks)
    monkeypatch.setattr(AccountUser, "wait_time", AccountUser.wait_time)


@pytest.mark.usefixtures("user_class_restored")
@pytest.mark.parametrize(
    "weights",
    [
        {"deposit": 3, "withdraw": 2, "transfer": 4, "balance": 2, "open_account": 0},
        {"deposit": 0, "withdraw": 1, "transfer": 0, "balance": 5, "open_account": 2},
    ],
)
def test_weights_set_the_task_mix(
    db_url: str, redis_url: str, weights: dict[str, int]
) -> None:
    keys = {f"workload.weights.{name}": w for name, w in weights.items()}
    profile = profile_with(db_url, redis_url, **keys)
    users.configure(profile.workload.weights, target_rate=0, users=1)

    name_of: dict[Any, str] = {task: name for name, task in users.TASKS.items()}
    tasks = Counter(name_of[task] for task in AccountUser.tasks)
    assert tasks == {name: w for name, w in weights.items() if w > 0}
    # Locust draws each next task from that list: a task of weight 0 never runs.
    user = AccountUser(Environment(user_classes=[AccountUser], events=Events()))
    drawn = {name_of[DefaultTaskSet(user).get_next_task()] for _ in range(2000)}
    assert drawn == set(tasks)


@pytest.mark.usefixtures("user_class_restored")
@pytest.mark.parametrize(
    ("args", "profile_rate", "expected"),
    [([], "2.5", 2.5), ([], "40", 40.0), (["-r", "7"], "40", 7.0)],
)
def test_spawn_rate_reaches_the_options_locust_starts_users_with(
    monkeypatch: pytest.MonkeyPatch,
    db_url: str,
    redis_url: str,
    args: list[str],
    profile_rate: str,
    expected: float,
) -> None:
    # Locust's main loop calls runner.start(options.num_users, options.spawn_rate)
    # after init; the project's only part is to set the option in its init hook,
    # unless -r was given. A fresh hook state and event set keep the listeners the
    # hook adds out of the rest of the suite.
    for name in ("LOCUST_SPAWN_RATE", "CDC_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("CDC_WORKLOAD__SPAWN_RATE", profile_rate)
    argv = [
        "-f",
        "locustfile.py",
        "--cdc-profile",
        str(ROOT / "configs/optimized.yaml"),
    ]
    monkeypatch.setattr(sys, "argv", ["locust", *argv, *args])
    monkeypatch.setattr(hooks, "STATE", hooks._State())
    monkeypatch.setattr(hooks, "events", Events())
    parser = get_parser()
    hooks._add_options(parser)
    options = parser.parse_args(sys.argv[1:])
    environment = Environment(
        user_classes=[AccountUser], events=Events(), parsed_options=options
    )

    hooks._on_init(environment)

    assert options.spawn_rate == expected


# Deadlines: the harness's event store, through the users' own calls.


@pytest.mark.parametrize("deadline_s", [0.2, 0.6])
def test_write_deadline_ends_a_blocked_write(
    conn: Conn, db_url: str, redis_url: str, deadline_s: float
) -> None:
    profile = profile_with(db_url, redis_url, **{"deadlines.write": deadline_s})
    with started_harness(conn, profile) as harness:
        account = harness.accounts[0]
        blocker = lock_account(db_url, account)
        try:
            started = time.monotonic()
            with pytest.raises(OperationTimeout):
                harness.write(deposit(account, 1))
            took = time.monotonic() - started
        finally:
            blocker.rollback()
            blocker.close()

    assert deadline_s <= took < deadline_s + green.CLIENT_MARGIN_S


@pytest.mark.parametrize("deadline_s", [0.2, 0.6])
def test_read_deadline_ends_a_blocked_balance_read(
    conn: Conn, db_url: str, redis_url: str, redis_client: Any, deadline_s: float
) -> None:
    profile = profile_with(db_url, redis_url, **{"deadlines.read": deadline_s})
    with started_harness(conn, profile) as harness:
        account = harness.accounts[0]
        # The cache is empty, so the read goes to the projection, held here.
        with blocked_table(db_url, "account_projections"):
            started = time.monotonic()
            with pytest.raises(OperationTimeout):
                harness.read_balance(account)
            took = time.monotonic() - started

    assert deadline_s <= took < deadline_s + green.CLIENT_MARGIN_S


# CDC: the consumer (max_lag, backlog_warn_bytes, status_interval) and the feed.


@contextmanager
def running_consumer(stack: Stack, **keys: Any) -> Iterator[Consumer]:
    """A consumer on the stack's own slot, started here and closed on exit."""
    profile = profile_with(
        stack.db_url,
        stack.redis_url,
        **{
            "cdc.slot_name": stack.slot,
            "cdc.publication_name": stack.publication,
            "projection_store.pool.min_size": 1,
            **keys,
        },
    )
    consumer = Consumer(profile, process="keys")
    consumer.start()
    try:
        yield consumer
    finally:
        consumer.close()


def step_until(consumer: Consumer, done: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not done():
        assert time.monotonic() < deadline, "the consumer did not get there in 5 s"
        consumer.step()


@pytest.mark.parametrize(("max_lag", "late"), [("100ms", 1), ("5s", 0)])
def test_max_lag_counts_a_late_transaction_in_the_consumer(
    stack: Stack, conn: Conn, max_lag: str, late: int
) -> None:
    with running_consumer(stack, **{"cdc.max_lag": max_lag}) as consumer:
        create_accounts(conn, 1, 100, batch_size=1)
        gevent.sleep(APPLY_DELAY_S)
        step_until(consumer, lambda: consumer.stats.transactions >= 1)

    assert consumer.stats.lag.summary()["max"] >= APPLY_DELAY_S * 1000
    assert consumer.stats.late == late


@pytest.mark.parametrize(
    ("warn_bytes", "warned"), [(50_000, True), (BACKLOG_WARN_BYTES, False)]
)
def test_backlog_warn_bytes_warns_past_the_limit(
    stack: Stack,
    conn: Conn,
    caplog: pytest.LogCaptureFixture,
    warn_bytes: int,
    warned: bool,
) -> None:
    # The sql reader confirms only what the consumer applied; the stream reader
    # follows the server's position while idle, which would shrink this backlog.
    keys = {"cdc.reader": "sql", "cdc.backlog_warn_bytes": warn_bytes}
    with running_consumer(stack, **keys) as consumer:
        # WAL that no published transaction carries, so nothing ever confirms it.
        conn.execute(
            "SELECT pg_logical_emit_message(false, 'cdc_load_test', repeat('x', %s))",
            (UNCONFIRMED_BYTES,),
        )
        with caplog.at_level(logging.WARNING, logger="cdcload.cdc"):
            consumer.step()  # the first step always reports the slot's state

    # Between the two limits: only the key decides whether this is a warning.
    assert 50_000 < consumer.stats.max_backlog_bytes < BACKLOG_WARN_BYTES
    warnings = [r.getMessage() for r in caplog.records if "bytes behind" in r.msg]
    assert len(warnings) == warned
    if warned:
        assert f"(warns past {warn_bytes})" in warnings[0]


@pytest.mark.parametrize(("interval", "applied"), [("100ms", "1"), ("30s", "0")])
def test_status_interval_paces_the_consumer_status_in_redis(
    stack: Stack, conn: Conn, redis_client: Any, interval: str, applied: str
) -> None:
    with running_consumer(stack, **{"cdc.status_interval": interval}) as consumer:
        consumer.step()  # the first step reports: nothing applied yet
        create_accounts(conn, 1, 100, batch_size=1)
        step_until(consumer, lambda: consumer.stats.transactions >= 1)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            consumer.step()
    # Closed: the cache writer has flushed every status it was offered.

    status = redis_client.hgetall(cache.status_key(stack.slot))
    assert status["applied_transactions"] == applied


@contextmanager
def reading_feed(profile: Profile) -> Iterator[tuple[CdcFeed, list[Any]]]:
    """A started feed, and the exception of each request it fires (None if none)."""
    environment = Environment(events=Events())
    outcomes: list[Any] = []

    def on_request(exception: Any, **_kwargs: Any) -> None:
        outcomes.append(exception)

    environment.events.request.add_listener(on_request)
    feed = CdcFeed(environment, profile)
    feed.start()
    try:
        yield feed, outcomes
    finally:
        feed.stop()


@pytest.mark.parametrize(("max_lag", "late"), [("100ms", 1), ("1s", 0)])
def test_max_lag_fails_a_late_propagation_in_locust(
    db_url: str, redis_url: str, redis_client: Any, max_lag: str, late: int
) -> None:
    slot = unique("cdc_load_f")
    profile = profile_with(
        db_url, redis_url, **{"cdc.slot_name": slot, "cdc.max_lag": max_lag}
    )
    with reading_feed(profile) as (feed, outcomes):
        # As the consumer's cache writer sends them: one entry per flush.
        redis_client.xadd(cache.lag_stream(slot), {"lags": "40.00,250.00"})
        assert feed.catch_up()

    assert len(outcomes) == 2
    assert sum(isinstance(e, PropagationLate) for e in outcomes) == late
    assert feed.late == late


@pytest.mark.parametrize(
    ("interval", "least", "most"), [("100ms", 3, 10), ("30s", 1, 1)]
)
def test_status_interval_paces_the_feed_status_samples(
    db_url: str,
    redis_url: str,
    redis_client: Any,
    interval: str,
    least: int,
    most: int,
) -> None:
    slot = unique("cdc_load_f")
    profile = profile_with(
        db_url, redis_url, **{"cdc.slot_name": slot, "cdc.status_interval": interval}
    )
    redis_client.hset(
        cache.status_key(slot), mapping={"backlog_bytes": "10", "lag_p99_ms": "2.5"}
    )
    with reading_feed(profile) as (feed, _):
        gevent.sleep(0.9)

    # The feed wakes at least every XREAD block (200 ms) to look at the clock.
    assert least <= len(feed.history) <= most


# Thresholds: the verdict flips where the limit is.


def verdict(verdicts: list[Verdict], name: str) -> Verdict:
    [found] = [v for v in verdicts if v.name == name]
    return found


#: Each threshold key: the verdict row it limits and the measure it is compared to.
THRESHOLDS = {
    "max_cdc_lag_p99_ms": ("p99 cdc lag ms", "cdc_lag_p99_ms"),
    "max_verification_violations": ("verification violations", "violations"),
}


@pytest.mark.parametrize(
    ("key", "limit", "value", "passed"),
    [
        ("max_cdc_lag_p99_ms", 50, 50.0, True),
        ("max_cdc_lag_p99_ms", 50, 50.5, False),
        ("max_cdc_lag_p99_ms", 200, 50.5, True),
        ("max_cdc_lag_p99_ms", 200, 201.0, False),
        ("max_verification_violations", 0, 0, True),
        ("max_verification_violations", 0, 1, False),
        ("max_verification_violations", 2, 2, True),
        ("max_verification_violations", 2, 3, False),
    ],
)
def test_threshold_limit_is_the_most_that_passes(
    db_url: str, redis_url: str, key: str, limit: int, value: float, passed: bool
) -> None:
    row, measured = THRESHOLDS[key]
    limits = profile_with(db_url, redis_url, **{f"thresholds.{key}": limit}).thresholds
    measures: dict[str, Any] = {measured: value}
    verdicts = evaluate(limits, failure_ratio=0.0, p99_ms=1.0, **measures)
    found = verdict(verdicts, row)
    assert (found.limit, found.passed) == (limit, passed)
