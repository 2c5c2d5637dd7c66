"""The verifier on a real drained state, clean and then broken one thing at a time.

The state is made for real: accounts opened and commands run through the event
store, then projections, applied transactions and cache entries derived from the
events with SQL exactly as a correct consumer would leave them. Each corruption
test breaks one table, row or key and checks that the matching check names the
offender while the checks it cannot logically affect stay clean.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services import projections, verify
from services.config import PoolSettings
from services.eventstore import (
    Command,
    EventStore,
    create_accounts,
    deposit,
    transfer,
    withdraw,
)
from services.pool import Conn, Pool
from tests.conftest import unique

ALL_CHECKS = {
    "projection_matches_store",
    "no_orphan_projection",
    "transactions_applied_once",
    "money_conserved",
    "no_negative_balance",
    "cache_matches_projection",
}
OPENING_BALANCE = 1000
ACCOUNTS = 12
COMMANDS = 30

# Projections and applied rows as a correct consumer leaves them: one applied row
# per source transaction since the slot started, with the 32-bit xid pgoutput
# carries, a rising commit LSN and a lag of 1 to 10 ms.
SQL_MIRROR = (
    "DELETE FROM account_projections",
    """
INSERT INTO account_projections (account_id, balance, version, updated_at)
SELECT account_id, sum(delta), max(version), max(created_at)
FROM events GROUP BY account_id
""",
    "DELETE FROM cdc_applied WHERE slot_name = %(slot)s",
    """
INSERT INTO cdc_applied (slot_name, commit_lsn, xid, events, commit_ts, applied_at)
SELECT %(slot)s, ('0/' || to_hex(16 * n))::pg_lsn, xid, events, commit_ts,
       commit_ts + interval '1 ms' * (1 + n %% 10)
FROM (
    SELECT mod(txid::text::bigint, 4294967296) AS xid, count(*) AS events,
           max(created_at) AS commit_ts,
           row_number() OVER (ORDER BY min(position)) AS n
    FROM events
    WHERE position > (
        SELECT start_position FROM cdc_checkpoint WHERE slot_name = %(slot)s
    )
    GROUP BY txid
) AS t
""",
    """
UPDATE cdc_checkpoint c
   SET applied_transactions = a.n, commit_lsn = a.last, end_lsn = a.last
  FROM (
    SELECT count(*) AS n, coalesce(max(commit_lsn), '0/0') AS last
    FROM cdc_applied WHERE slot_name = %(slot)s
  ) AS a
 WHERE c.slot_name = %(slot)s
""",
)


@dataclass(frozen=True)
class State:
    """A consistent drained system and the handles to break it."""

    conn: Conn
    cache: redis.Redis
    slot: str
    prefix: str
    accounts: list[int]

    def run(self, *, sample: int = verify.SAMPLE) -> verify.Report:
        """Verify this state with its own slot and key prefix."""
        return verify.verify(
            self.conn, self.cache, slot=self.slot, key_prefix=self.prefix, sample=sample
        )

    def mirror(self) -> None:
        """Derive projections and applied rows from the events, then the cache."""
        with self.conn.transaction():
            for statement in SQL_MIRROR:
                self.conn.execute(statement, {"slot": self.slot})
        self.fill_cache()

    def fill_cache(self) -> None:
        """Make the cache hold exactly the projections."""
        clear(self.cache, self.prefix)
        rows = self.conn.execute(
            "SELECT account_id, balance, version FROM account_projections"
        ).fetchall()
        pipe = self.cache.pipeline(transaction=False)
        for account_id, balance, version in rows:
            pipe.hset(
                f"{self.prefix}{account_id}",
                mapping={"balance": str(balance), "version": str(version)},
            )
        pipe.execute()

    def one(self, query: str, *params: object) -> object:
        row = self.conn.execute(query, params).fetchone()
        assert row is not None
        return row[0]


def clear(client: redis.Redis, prefix: str) -> None:
    keys = list(client.scan_iter(match=prefix + "*", count=500))
    if keys:
        client.delete(*keys)


def failing(report: verify.Report) -> set[str]:
    return {c.name for c in report.checks if not c.passed}


def subjects(report: verify.Report, name: str) -> list[str]:
    return [e.subject for e in report.check(name).examples]


def run_commands(db_url: str, accounts: list[int], count: int) -> None:
    """Run deposits, withdrawals and transfers, each its own transaction."""
    rng = random.Random(20240601)
    settings = PoolSettings(min_size=0, max_size=2, acquire_timeout=5.0)
    with Pool(db_url, settings, role="verify-test") as pool:
        store = EventStore(
            pool, write_deadline_s=5.0, read_deadline_s=5.0, conflict_attempts=3
        )
        for i in range(count):
            a, b = rng.sample(accounts, 2)
            # Small amounts against large balances: no command is refused.
            amount = rng.randint(1, 50)
            cmd: Command
            if i % 3 == 0:
                cmd = deposit(a, amount)
            elif i % 3 == 1:
                cmd = withdraw(a, amount)
            else:
                cmd = transfer(a, b, amount)
            store.execute(cmd)


def build(
    conn: Conn, db_url: str, cache: redis.Redis, *, opened_before: int = 0
) -> State:
    """Open accounts, run commands and derive a consistent downstream state."""
    projections.reset(conn)
    slot = unique("cdc_load_verify")
    prefix = unique("t") + ":account:"
    early = create_accounts(conn, opened_before, OPENING_BALANCE, batch_size=5)
    projections.start_checkpoint(conn, slot)
    # Several accounts per batch: source transactions with more than one event.
    later = create_accounts(conn, ACCOUNTS, OPENING_BALANCE, batch_size=5)
    state = State(conn, cache, slot, prefix, early + later)
    run_commands(db_url, state.accounts, COMMANDS)
    state.mirror()
    return state


@pytest.fixture
def cache(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def state(conn: Conn, db_url: str, cache: redis.Redis) -> Iterator[State]:
    built = build(conn, db_url, cache)
    yield built
    clear(cache, built.prefix)


def test_clean_state_passes_every_check(
    state: State, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cdcload.verify")
    report = state.run()

    assert {c.name for c in report.checks} == ALL_CHECKS
    for check in report.checks:
        assert check.violations == 0, (check.name, check.description)
        assert check.examples == ()
    assert report.passed

    transactions = state.one("SELECT count(DISTINCT txid) FROM events")
    assert report.lag.count == transactions == 3 + COMMANDS
    assert report.lag.p50_ms is not None and report.lag.max_ms is not None
    assert 1.0 <= report.lag.p50_ms <= report.lag.max_ms <= 10.0 + 1e-6
    assert "all 12 accounts" in report.check("projection_matches_store").description

    started = [r for r in caplog.records if r.getMessage().endswith(": starting")]
    assert len(started) == len(ALL_CHECKS)
    assert all(r.name == "cdcload.verify" for r in caplog.records)

    lines = verify.render(report)
    assert lines[0].split() == ["check", "violations", "result", "examples"]
    assert all(f"{name} " in "\n".join(lines) for name in ALL_CHECKS)
    assert "FAIL" not in "\n".join(lines)

    path = verify.write_json(report, tmp_path / "reports" / "verification.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["passed"] is True
    assert data["slot"] == state.slot
    assert {c["name"] for c in data["checks"]} == ALL_CHECKS
    assert data["lag"]["count"] == transactions


def test_events_before_the_slot_started_are_not_expected(
    conn: Conn, db_url: str, cache: redis.Redis
) -> None:
    state = build(conn, db_url, cache, opened_before=4)
    try:
        report = state.run()
    finally:
        clear(cache, state.prefix)

    assert report.passed, verify.render(report)
    # One batch of four accounts came before the slot, and has no applied row.
    check = report.check("transactions_applied_once")
    assert check.description.startswith(f"{3 + COMMANDS} transactions committed")


def test_changed_projected_balance(state: State) -> None:
    target = state.accounts[3]
    state.conn.execute(
        "UPDATE account_projections SET balance = balance + 7 WHERE account_id = %s",
        (target,),
    )
    state.fill_cache()

    report = state.run()

    # The total moves with the balance; nothing else can tell.
    assert failing(report) == {"projection_matches_store", "money_conserved"}
    check = report.check("projection_matches_store")
    assert check.violations == 1
    assert subjects(report, "projection_matches_store") == [f"account {target}"]
    assert subjects(report, "money_conserved") == ["total"]
    assert not report.passed


def test_changed_projected_version(state: State) -> None:
    target = state.accounts[5]
    state.conn.execute(
        "UPDATE account_projections SET version = version + 1 WHERE account_id = %s",
        (target,),
    )
    state.fill_cache()

    report = state.run()

    assert failing(report) == {"projection_matches_store"}
    assert subjects(report, "projection_matches_store") == [f"account {target}"]
    assert "version" in report.check("projection_matches_store").examples[0].detail


def test_deleted_projection(state: State) -> None:
    target = state.accounts[0]
    state.conn.execute(
        "DELETE FROM account_projections WHERE account_id = %s", (target,)
    )
    state.fill_cache()

    report = state.run()

    assert failing(report) == {"projection_matches_store", "money_conserved"}
    example = report.check("projection_matches_store").examples[0]
    assert example.subject == f"account {target}"
    assert example.detail.endswith("no projection")


def test_orphan_projection(state: State) -> None:
    orphan = max(state.accounts) + 1000
    # A zero balance keeps the total intact, so only the orphan check can see it.
    state.conn.execute(
        "INSERT INTO account_projections VALUES (%s, 0, 1, now())", (orphan,)
    )
    state.fill_cache()

    report = state.run()

    assert failing(report) == {"no_orphan_projection"}
    assert subjects(report, "no_orphan_projection") == [f"account {orphan}"]


def test_lost_transaction(state: State) -> None:
    xid = state.one(
        "SELECT xid FROM cdc_applied WHERE slot_name = %s ORDER BY commit_lsn"
        " OFFSET 10 LIMIT 1",
        state.slot,
    )
    state.conn.execute(
        "DELETE FROM cdc_applied WHERE slot_name = %s AND xid = %s", (state.slot, xid)
    )

    report = state.run()

    assert failing(report) == {"transactions_applied_once"}
    check = report.check("transactions_applied_once")
    assert check.violations == 1
    assert subjects(report, "transactions_applied_once") == [f"xid {xid}"]
    assert "never applied" in check.examples[0].detail
    assert "1 never applied" in check.description


def test_replayed_transaction(state: State) -> None:
    xid = state.one(
        "SELECT xid FROM cdc_applied WHERE slot_name = %s ORDER BY commit_lsn"
        " OFFSET 4 LIMIT 1",
        state.slot,
    )
    state.conn.execute(
        "INSERT INTO cdc_applied SELECT slot_name, '7/0', xid, events, commit_ts,"
        " applied_at FROM cdc_applied WHERE slot_name = %s AND xid = %s",
        (state.slot, xid),
    )

    report = state.run()

    assert failing(report) == {"transactions_applied_once"}
    check = report.check("transactions_applied_once")
    assert check.violations == 1
    assert subjects(report, "transactions_applied_once") == [f"xid {xid}"]
    assert "applied 2 times" in check.examples[0].detail
    assert "7/0" in check.examples[0].detail


def test_applied_transaction_not_in_the_store(state: State) -> None:
    state.conn.execute(
        "INSERT INTO cdc_applied VALUES (%s, '8/0', 4000000000, 2, now(), now())",
        (state.slot,),
    )

    report = state.run()

    assert failing(report) == {"transactions_applied_once"}
    assert subjects(report, "transactions_applied_once") == ["xid 4000000000"]


def test_missing_checkpoint(state: State) -> None:
    state.conn.execute("DELETE FROM cdc_checkpoint WHERE slot_name = %s", (state.slot,))

    report = state.run()

    assert failing(report) == {"transactions_applied_once"}
    check = report.check("transactions_applied_once")
    assert check.violations == 1
    assert "no row in cdc_checkpoint" in check.description


def test_transfer_that_does_not_net_to_zero(state: State) -> None:
    row = state.conn.execute(
        "SELECT transaction_id, account_id FROM events"
        " WHERE event_type = 'TransferCredited' ORDER BY position LIMIT 1"
    ).fetchone()
    assert row is not None
    tx, credited = row
    # A second credit in the same transfer, written as the store writes events:
    # head and event together, so the store and its heads stay consistent.
    state.conn.execute(
        "WITH head AS (UPDATE accounts SET version = version + 1,"
        " balance = balance + 5 WHERE account_id = %s RETURNING account_id, version)"
        " INSERT INTO events (account_id, version, event_type, delta, transaction_id)"
        " SELECT account_id, version, 'TransferCredited', 5, %s FROM head",
        (credited, tx),
    )
    # The consumer applies that event like any other.
    state.mirror()

    report = state.run()

    assert failing(report) == {"money_conserved"}
    check = report.check("money_conserved")
    assert check.violations == 1
    assert subjects(report, "money_conserved") == [f"transaction {tx}"]
    assert "2 credit(s), net 5" in check.examples[0].detail


def test_negative_projected_balance(state: State) -> None:
    target = state.accounts[7]
    state.conn.execute(
        "UPDATE account_projections SET balance = -50 WHERE account_id = %s",
        (target,),
    )
    state.fill_cache()

    report = state.run()

    # A negative projection is also a wrong one, and moves the total.
    assert failing(report) == {
        "no_negative_balance",
        "projection_matches_store",
        "money_conserved",
    }
    check = report.check("no_negative_balance")
    assert check.violations == 1
    assert check.examples == (
        verify.Example(f"account {target}", "projection balance -50"),
    )


def test_changed_cached_balance(state: State) -> None:
    target = state.accounts[2]
    state.cache.hincrby(f"{state.prefix}{target}", "balance", 3)

    report = state.run()

    assert failing(report) == {"cache_matches_projection"}
    check = report.check("cache_matches_projection")
    assert check.violations == 1
    assert subjects(report, "cache_matches_projection") == [f"account {target}"]


def test_cached_entry_without_account(state: State) -> None:
    ghost = max(state.accounts) + 1000
    state.cache.hset(
        f"{state.prefix}{ghost}", mapping={"balance": "10", "version": "1"}
    )

    report = state.run()

    assert failing(report) == {"cache_matches_projection"}
    example = report.check("cache_matches_projection").examples[0]
    assert example.subject == f"account {ghost}"
    assert example.detail.endswith("no projection")


def test_malformed_cache_entries(state: State) -> None:
    target = state.accounts[1]
    state.cache.hset(f"{state.prefix}{target}", "balance", "lots")
    state.cache.set(f"{state.prefix}{state.accounts[4]}", "not a hash")
    state.cache.hset(f"{state.prefix}junk", mapping={"balance": "1", "version": "1"})

    report = state.run()

    assert failing(report) == {"cache_matches_projection"}
    check = report.check("cache_matches_projection")
    assert check.violations == 3
    assert subjects(report, "cache_matches_projection") == [
        f"key {state.prefix}junk",
        f"account {target}",
        f"account {state.accounts[4]}",
    ]


def test_absent_cache_entries_are_allowed(state: State) -> None:
    clear(state.cache, state.prefix)

    report = state.run()

    assert report.passed
    assert "0 cached accounts" in report.check("cache_matches_projection").description


def test_unreachable_cache_fails_its_check(state: State) -> None:
    closed = redis.Redis.from_url(
        "redis://127.0.0.1:1/0",
        socket_connect_timeout=0.2,
        socket_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        report = verify.verify(
            state.conn, closed, slot=state.slot, key_prefix=state.prefix
        )
    finally:
        closed.close()

    assert failing(report) == {"cache_matches_projection"}
    check = report.check("cache_matches_projection")
    assert check.violations == 1
    assert check.description.startswith("the cache could not be read")
    assert not report.passed


def test_no_cache_client_fails_its_check(state: State) -> None:
    report = verify.verify(state.conn, None, slot=state.slot, key_prefix=state.prefix)

    assert failing(report) == {"cache_matches_projection"}
    assert "could not be read" in report.check("cache_matches_projection").description


def test_examples_are_the_first_offenders(state: State) -> None:
    targets = sorted(state.accounts)[2:6]
    state.conn.execute(
        "UPDATE account_projections SET version = version + 1"
        " WHERE account_id = ANY(%s)",
        (targets,),
    )
    # Stale cache entries for the same accounts: four cache violations too.

    report = state.run(sample=2)

    assert failing(report) == {"projection_matches_store", "cache_matches_projection"}
    for name in ("projection_matches_store", "cache_matches_projection"):
        assert report.check(name).violations == len(targets)
        assert subjects(report, name) == [f"account {a}" for a in targets[:2]]

    lines = "\n".join(verify.render(report))
    assert "FAIL" in lines
    assert f"account {targets[0]}, account {targets[1]}" in lines


def test_json_report_of_a_failure(state: State, tmp_path: Path) -> None:
    state.conn.execute("DELETE FROM cdc_applied WHERE slot_name = %s", (state.slot,))

    report = state.run()
    path = verify.write_json(report, tmp_path / "out" / "verification.json")

    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["passed"] is False
    assert data["lag"] == {
        "count": 0,
        "p50_ms": None,
        "p95_ms": None,
        "p99_ms": None,
        "max_ms": None,
    }
    (applied,) = [c for c in data["checks"] if c["name"] == "transactions_applied_once"]
    assert applied["violations"] == 3 + COMMANDS
    assert len(applied["examples"]) == verify.SAMPLE
    assert "lag: no transactions applied" in verify.render(report)
