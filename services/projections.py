"""Account projections kept by the CDC consumer, and their checkpoint.

Tables (the first one's column names are a contract, like the event store's):

- `account_projections(account_id, balance, version, updated_at)`: each account as
  the consumer last applied it;
- `cdc_checkpoint`: per slot, the commit LSN of the last source transaction applied,
  written in the same transaction as the projections it produced, so a replay after
  a crash is recognised and skipped: at-least-once delivery, exactly-once effect;
- `cdc_applied`: one row per applied source transaction (its xid, commit LSN, commit
  time and the server's clock_timestamp() when it was applied), for verification
  and for lag on one clock;
- `cdc_markers`: published beside `events` so that a drain can put a barrier in the
  stream: once a marker inserted after the load has been applied, everything
  committed before it has been too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from services import logs
from services.errors import CdcLoadError
from services.pgoutput import format_lsn, parse_lsn
from services.pool import Conn
from services.sqlarrays import array_literal

logger = logs.get("projections")

DDL = """
CREATE TABLE IF NOT EXISTS account_projections (
    account_id bigint PRIMARY KEY,
    balance bigint NOT NULL,
    version integer NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS cdc_checkpoint (
    slot_name text PRIMARY KEY,
    commit_lsn pg_lsn NOT NULL,
    end_lsn pg_lsn NOT NULL,
    applied_transactions bigint NOT NULL,
    start_position bigint NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS cdc_applied (
    slot_name text NOT NULL,
    commit_lsn pg_lsn NOT NULL,
    xid bigint NOT NULL,
    events integer NOT NULL,
    commit_ts timestamptz NOT NULL,
    applied_at timestamptz NOT NULL,
    PRIMARY KEY (slot_name, commit_lsn)
);

CREATE TABLE IF NOT EXISTS cdc_markers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

RESET = "TRUNCATE account_projections, cdc_checkpoint, cdc_applied, cdc_markers"


class OrderViolation(CdcLoadError):
    """A source transaction's events do not follow the projection's versions."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The last applied source transaction of a slot."""

    slot_name: str
    commit_lsn: int
    end_lsn: int
    applied_transactions: int
    start_position: int


class RowLike(Protocol):
    """One event as the projections need it (a decoded `events` insert)."""

    @property
    def account_id(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def delta(self) -> int: ...


class TxLike(Protocol):
    """One source transaction to apply: its identity, time and events."""

    @property
    def xid(self) -> int: ...
    @property
    def commit_lsn(self) -> int: ...
    @property
    def end_lsn(self) -> int: ...
    @property
    def commit_ts(self) -> datetime: ...
    @property
    def rows(self) -> Sequence[RowLike]: ...


@dataclass(frozen=True, slots=True)
class Applied:
    """What one projection transaction did."""

    transactions: int
    skipped: int
    events: int
    #: (account_id, balance, version) of every account it touched, final values.
    accounts: list[tuple[int, int, int]]
    #: Per applied source transaction: applied_at - commit_ts, in milliseconds.
    lags_ms: list[float]
    checkpoint: Checkpoint | None


def create(conn: Conn) -> None:
    """Create the projection tables if they are missing."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('cdc-load projections'))")
        conn.execute(DDL)


def reset(conn: Conn) -> None:
    """Empty the projections, checkpoints, applied log and markers."""
    create(conn)
    with conn.transaction():
        conn.execute(RESET)


def load_checkpoint(conn: Conn, slot: str) -> Checkpoint | None:
    """Return the slot's checkpoint, or None before its first transaction."""
    row = conn.execute(
        "SELECT slot_name, commit_lsn::text, end_lsn::text, applied_transactions,"
        " start_position FROM cdc_checkpoint WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    return Checkpoint(
        row[0], parse_lsn(row[1]), parse_lsn(row[2]), int(row[3]), int(row[4])
    )


def start_checkpoint(conn: Conn, slot: str) -> Checkpoint:
    """Record where a new slot starts: nothing applied, events up to now excluded.

    Events already in the store when the slot was made are not in its stream; the
    verifier counts only those after `start_position`.
    """
    row = conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()
    start = int(row[0]) if row else 0
    conn.execute(
        "INSERT INTO cdc_checkpoint (slot_name, commit_lsn, end_lsn,"
        " applied_transactions, start_position, updated_at)"
        " VALUES (%s, '0/0', '0/0', 0, %s, clock_timestamp())"
        " ON CONFLICT (slot_name) DO UPDATE SET commit_lsn = '0/0', end_lsn = '0/0',"
        " applied_transactions = 0, start_position = EXCLUDED.start_position,"
        " updated_at = EXCLUDED.updated_at",
        (slot, start),
    )
    return Checkpoint(slot, 0, 0, 0, start)


# One statement, so one round trip and its own transaction: every write is guarded
# by `go`, which holds only if the slot has a checkpoint and no account's first
# version in the batch fails to follow its projection. Either guard failing
# writes nothing at all. The consumer is the projections' only writer, so the
# statement's snapshot is their current state.
SQL_APPLY = """
WITH u AS (
    SELECT * FROM unnest(
        %(ids)s::bigint[], %(deltas)s::bigint[], %(lasts)s::integer[],
        %(firsts)s::integer[]
    ) AS u(account_id, delta, last_version, first_version)
),
bad AS (
    SELECT u.account_id, u.first_version, coalesce(p.version, 0) AS have
    FROM u LEFT JOIN account_projections AS p USING (account_id)
    WHERE coalesce(p.version, 0) <> u.first_version - 1
),
go AS (
    SELECT 1 FROM cdc_checkpoint
    WHERE slot_name = %(slot)s AND NOT EXISTS (SELECT 1 FROM bad)
),
up AS (
    INSERT INTO account_projections AS p (account_id, balance, version, updated_at)
    SELECT account_id, delta, last_version, clock_timestamp() FROM u
    WHERE EXISTS (SELECT 1 FROM go)
    ON CONFLICT (account_id) DO UPDATE
        SET balance = p.balance + EXCLUDED.balance,
            version = EXCLUDED.version,
            updated_at = EXCLUDED.updated_at
    RETURNING account_id, balance, version
),
app AS (
    INSERT INTO cdc_applied (slot_name, commit_lsn, xid, events, commit_ts, applied_at)
    SELECT %(slot)s, l::pg_lsn, x, e, t, clock_timestamp()
    FROM unnest(
        %(lsns)s::text[], %(xids)s::bigint[], %(counts)s::integer[],
        %(times)s::timestamptz[]
    ) AS a(l, x, e, t)
    WHERE EXISTS (SELECT 1 FROM go)
    RETURNING events, extract(epoch FROM applied_at - commit_ts) * 1000 AS lag_ms
),
ck AS (
    UPDATE cdc_checkpoint
       SET commit_lsn = %(commit)s::pg_lsn, end_lsn = %(end)s::pg_lsn,
           applied_transactions = applied_transactions + %(n)s,
           updated_at = clock_timestamp()
     WHERE slot_name = %(slot)s AND EXISTS (SELECT 1 FROM go)
    RETURNING slot_name, commit_lsn::text AS commit_lsn, end_lsn::text AS end_lsn,
              applied_transactions, start_position
)
SELECT
    (SELECT count(*) FROM cdc_checkpoint WHERE slot_name = %(slot)s),
    (SELECT json_agg(json_build_array(account_id, first_version, have)) FROM bad),
    (SELECT json_agg(json_build_array(account_id, balance, version)) FROM up),
    (SELECT json_agg(lag_ms) FROM app WHERE events > 0),
    (SELECT row_to_json(ck) FROM ck)
"""


def apply(conn: Conn, slot: str, txs: Sequence[TxLike], after_lsn: int) -> Applied:
    """Apply source transactions as one projection transaction, with the checkpoint.

    Transactions whose commit LSN is not past `after_lsn` (the checkpoint) were
    applied before a crash and are skipped. Raise `OrderViolation`, and write
    nothing, if an account's events do not continue its projected version.
    """
    fresh = [tx for tx in txs if tx.commit_lsn > after_lsn]
    skipped = len(txs) - len(fresh)
    if not fresh:
        return Applied(0, skipped, 0, [], [], None)

    # Per account: the first version this batch brings, the last, and the sum.
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    total: dict[int, int] = {}
    events = 0
    for tx in fresh:
        for ch in tx.rows:
            events += 1
            seen = last.get(ch.account_id)
            if seen is None:
                first[ch.account_id] = ch.version
            elif ch.version != seen + 1:
                raise OrderViolation(
                    f"account {ch.account_id}: version {ch.version} after {seen}"
                    f" (transaction {tx.xid} at {format_lsn(tx.commit_lsn)})"
                )
            last[ch.account_id] = ch.version
            total[ch.account_id] = total.get(ch.account_id, 0) + ch.delta

    ids = sorted(last)
    tail = fresh[-1]
    # Numbers, LSNs and ISO timestamps need no quoting in an array literal.
    lit = array_literal
    row = conn.execute(
        SQL_APPLY,
        {
            "slot": slot,
            "ids": lit(ids),
            "deltas": lit(total[a] for a in ids),
            "lasts": lit(last[a] for a in ids),
            "firsts": lit(first[a] for a in ids),
            "lsns": lit(format_lsn(tx.commit_lsn) for tx in fresh),
            "xids": lit(tx.xid for tx in fresh),
            "counts": lit(len(tx.rows) for tx in fresh),
            "times": lit(tx.commit_ts.isoformat() for tx in fresh),
            "commit": format_lsn(tail.commit_lsn),
            "end": format_lsn(tail.end_lsn),
            "n": len(fresh),
        },
    ).fetchone()
    assert row is not None
    has_checkpoint, bad, accounts, lags, saved = row
    if not has_checkpoint:
        raise CdcLoadError(f"slot {slot} has no checkpoint row; start it first")
    if bad:
        account_id, arrived, have = min(bad)
        raise OrderViolation(
            f"account {account_id}: version {arrived} arrived, {have + 1} expected"
        )
    checkpoint = Checkpoint(
        saved["slot_name"],
        parse_lsn(saved["commit_lsn"]),
        parse_lsn(saved["end_lsn"]),
        int(saved["applied_transactions"]),
        int(saved["start_position"]),
    )
    return Applied(
        transactions=len(fresh),
        skipped=skipped,
        events=events,
        accounts=[(int(a), int(b), int(v)) for a, b, v in accounts or []],
        # Markers carry no events; their lag is not a propagation of the workload.
        lags_ms=[float(x) for x in lags or []],
        checkpoint=checkpoint,
    )


def read(conn: Conn, account_id: int) -> tuple[int, int] | None:
    """Return an account's projected (balance, version), or None if not projected."""
    row = conn.execute(
        "SELECT balance, version FROM account_projections WHERE account_id = %s",
        (account_id,),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))
