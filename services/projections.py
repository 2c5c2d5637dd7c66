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
from services.pool import Conn

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


def parse_lsn(text: str) -> int:
    """Parse an LSN written as `16/B374D848`."""
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    """Format an LSN as PostgreSQL writes it: `16/B374D848`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


SQL_VERSIONS = (
    "SELECT account_id, version FROM account_projections WHERE account_id = ANY(%s)"
)
SQL_UPSERT = """
INSERT INTO account_projections AS p (account_id, balance, version, updated_at)
SELECT a, d, v, clock_timestamp()
FROM unnest(%s::bigint[], %s::bigint[], %s::integer[]) AS u(a, d, v)
ON CONFLICT (account_id) DO UPDATE
    SET balance = p.balance + EXCLUDED.balance,
        version = EXCLUDED.version,
        updated_at = EXCLUDED.updated_at
RETURNING account_id, balance, version
"""
SQL_APPLIED = """
INSERT INTO cdc_applied (slot_name, commit_lsn, xid, events, commit_ts, applied_at)
SELECT %s, l::pg_lsn, x, e, t, clock_timestamp()
FROM unnest(%s::text[], %s::bigint[], %s::integer[], %s::timestamptz[]) AS u(l, x, e, t)
RETURNING events, extract(epoch FROM applied_at - commit_ts) * 1000
"""
SQL_CHECKPOINT = """
UPDATE cdc_checkpoint
   SET commit_lsn = %s::pg_lsn, end_lsn = %s::pg_lsn,
       applied_transactions = applied_transactions + %s,
       updated_at = clock_timestamp()
 WHERE slot_name = %s
RETURNING slot_name, commit_lsn::text, end_lsn::text, applied_transactions,
          start_position
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

    with conn.transaction():
        ids = sorted(last)
        accounts: list[tuple[int, int, int]] = []
        if ids:
            rows = conn.execute(SQL_VERSIONS, (ids,)).fetchall()
            known: dict[int, int] = {int(r[0]): int(r[1]) for r in rows}
            for account_id in ids:
                expected = known.get(account_id, 0) + 1
                if first[account_id] != expected:
                    raise OrderViolation(
                        f"account {account_id}: version {first[account_id]} arrived,"
                        f" {expected} expected"
                    )
            rows = conn.execute(
                SQL_UPSERT,
                (ids, [total[a] for a in ids], [last[a] for a in ids]),
            ).fetchall()
            accounts = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
        lag_rows = conn.execute(
            SQL_APPLIED,
            (
                slot,
                [format_lsn(tx.commit_lsn) for tx in fresh],
                [tx.xid for tx in fresh],
                [len(tx.rows) for tx in fresh],
                [tx.commit_ts for tx in fresh],
            ),
        ).fetchall()
        tail = fresh[-1]
        row = conn.execute(
            SQL_CHECKPOINT,
            (format_lsn(tail.commit_lsn), format_lsn(tail.end_lsn), len(fresh), slot),
        ).fetchone()
        if row is None:
            raise CdcLoadError(f"slot {slot} has no checkpoint row; start it first")
    checkpoint = Checkpoint(
        row[0], parse_lsn(row[1]), parse_lsn(row[2]), int(row[3]), int(row[4])
    )
    return Applied(
        transactions=len(fresh),
        skipped=skipped,
        events=events,
        accounts=accounts,
        # Markers carry no events; their lag is not a propagation of the workload.
        lags_ms=[float(r[1]) for r in lag_rows if r[0] > 0],
        checkpoint=checkpoint,
    )


def read(conn: Conn, account_id: int) -> tuple[int, int] | None:
    """Return an account's projected (balance, version), or None if not projected."""
    row = conn.execute(
        "SELECT balance, version FROM account_projections WHERE account_id = %s",
        (account_id,),
    ).fetchone()
    return None if row is None else (int(row[0]), int(row[1]))
