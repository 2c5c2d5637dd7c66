"""Invariants of a drained system: event store, projections, applied log and cache.

`verify` runs after the load has stopped and the CDC consumer has caught up, so
nothing is in flight and every derived copy must equal what the event store says.
Each invariant is a separate `Check` with its number of violations and the first
few offending accounts or transactions, so that a failed run names what to look
at. The database checks run in one read-only snapshot, each as a single set-based
statement; the cache is read with SCAN in batches and pipelined HMGETs, compared
one batch at a time against the projections.

The checks:

- `projection_matches_store`: each account's projected balance and version are the
  sum of its deltas and its last version in `events`;
- `no_orphan_projection`: no projection for an account without events;
- `transactions_applied_once`: every source transaction committed since the slot
  started is in `cdc_applied` exactly once, and nothing else is;
- `money_conserved`: the projections hold what the events add up to, and every
  transfer is one debit and one credit that net to zero;
- `no_negative_balance`: no projection and no account head below zero;
- `cache_matches_projection`: every cached account equals its projection.
"""

from __future__ import annotations

import heapq
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg.pq import TransactionStatus

from services import logs, projections
from services.cache import KEY_PREFIX
from services.errors import CdcLoadError
from services.pool import Conn

logger = logs.get("verify")

#: Offending accounts or transactions each check reports.
SAMPLE = 5
#: Keys asked for per SCAN call, and so per pipelined HMGET round trip.
SCAN_BATCH = 1000
#: Where `write_json` puts the report unless told otherwise.
REPORT_PATH = Path("reports") / "verification.json"
#: pgoutput carries the 32-bit xid; `events.txid` is the 64-bit xid8.
XID_MODULUS = 4294967296


class VerificationError(CdcLoadError):
    """The database could not be read, so no verdict could be given."""


@dataclass(frozen=True, slots=True)
class Example:
    """One offender: what it is (`account 17`, `xid 812`) and what is wrong."""

    subject: str
    detail: str


@dataclass(frozen=True, slots=True)
class Check:
    """One invariant: how many violations it found and the first of them."""

    name: str
    #: What was compared and what came out, with the numbers.
    description: str
    violations: int
    #: At most the `sample` asked for, lowest account or xid first where ordered.
    examples: tuple[Example, ...]

    @property
    def passed(self) -> bool:
        """Whether the invariant held."""
        return self.violations == 0


@dataclass(frozen=True, slots=True)
class LagStats:
    """Applied-at minus commit time over a slot's applied transactions, in ms.

    The percentiles and the maximum are None when nothing was applied.
    """

    count: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass(frozen=True, slots=True)
class Report:
    """Every check of one verification, and the slot's lag."""

    slot: str
    checks: tuple[Check, ...]
    #: True only if every check has no violations.
    passed: bool
    lag: LagStats
    elapsed_s: float

    def check(self, name: str) -> Check:
        """Return the check called `name`; raise KeyError if there is none."""
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)


def verify(
    conn: Conn,
    redis_client: redis.Redis | None,
    *,
    slot: str,
    key_prefix: str = KEY_PREFIX,
    sample: int = SAMPLE,
) -> Report:
    """Check every invariant of a drained system and return the report.

    The database checks share one REPEATABLE READ snapshot when `conn` is idle;
    inside a caller's transaction they see that transaction instead. A cache that
    cannot be read (no client, Redis down) fails its check rather than passing it.
    Raise `VerificationError` if the database cannot be read, for instance when
    the projection tables were never created, and ValueError if `sample` is
    negative.
    """
    if sample < 0:
        raise ValueError(f"sample {sample} is negative")
    started = time.monotonic()
    logger.info("verifying slot %s", slot)
    try:
        if conn.info.transaction_status == TransactionStatus.IDLE:
            with conn.transaction():
                conn.execute(
                    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
                )
                checks, lag = _run(conn, redis_client, slot, key_prefix, sample)
        else:
            checks, lag = _run(conn, redis_client, slot, key_prefix, sample)
    except psycopg.Error as exc:
        raise VerificationError(
            f"could not read the database to verify: {exc}"
        ) from exc

    report = Report(
        slot=slot,
        checks=tuple(checks),
        passed=all(c.passed for c in checks),
        lag=lag,
        elapsed_s=time.monotonic() - started,
    )
    failed = [c.name for c in checks if not c.passed]
    logger.info(
        "verified slot %s in %.2f s: %s",
        slot,
        report.elapsed_s,
        "failed " + ", ".join(failed) if failed else "all checks passed",
    )
    return report


def _run(
    conn: Conn, client: redis.Redis | None, slot: str, prefix: str, sample: int
) -> tuple[list[Check], LagStats]:
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("projection_matches_store", lambda: _projection_matches(conn, sample)),
        ("no_orphan_projection", lambda: _no_orphan(conn, sample)),
        ("transactions_applied_once", lambda: _applied_once(conn, slot, sample)),
        ("money_conserved", lambda: _money_conserved(conn, sample)),
        ("no_negative_balance", lambda: _no_negative(conn, sample)),
        ("cache_matches_projection", lambda: _cache(conn, client, prefix, sample)),
    ]
    checks: list[Check] = []
    for name, step in steps:
        logger.info("check %s: starting", name)
        began = time.monotonic()
        check = step()
        logger.info(
            "check %s: %s violations in %.0f ms; %s",
            name,
            check.violations,
            (time.monotonic() - began) * 1000,
            check.description,
        )
        checks.append(check)
    return checks, _lag(conn, slot)


# Each check's statement ends with this: the first `sample` rows of its `bad` CTE,
# by its `ord` column, as two arrays. Aggregates without GROUP BY always give one
# row, so a clean check still returns its counts.
_SAMPLE = """
sample AS (
    SELECT array_agg(subject ORDER BY ord) AS subjects,
           array_agg(detail ORDER BY ord) AS details
    FROM (SELECT subject, detail, ord FROM bad ORDER BY ord LIMIT %(sample)s) AS s
)"""

SQL_PROJECTION_MATCHES = f"""
WITH store AS (
    SELECT account_id, sum(delta) AS balance, max(version) AS version
    FROM events GROUP BY account_id
),
bad AS (
    SELECT 'account ' || s.account_id AS subject,
           'store balance ' || s.balance || ' version ' || s.version
           || coalesce(', projection balance ' || p.balance
                       || ' version ' || p.version, ', no projection') AS detail,
           s.account_id AS ord
    FROM store s LEFT JOIN account_projections p USING (account_id)
    WHERE p.account_id IS NULL OR p.balance <> s.balance OR p.version <> s.version
),
{_SAMPLE}
SELECT (SELECT count(*) FROM bad), (SELECT count(*) FROM store),
       subjects, details
FROM sample
"""

SQL_NO_ORPHAN = f"""
WITH bad AS (
    SELECT 'account ' || p.account_id AS subject,
           'projection balance ' || p.balance || ' version ' || p.version
           || ', no events' AS detail,
           p.account_id AS ord
    FROM account_projections p
    WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.account_id = p.account_id)
),
{_SAMPLE}
SELECT (SELECT count(*) FROM bad), (SELECT count(*) FROM account_projections),
       subjects, details
FROM sample
"""

# kind 0: committed, never applied; 1: applied, never committed (since the slot
# started); 2: applied more than once. `weight` is how many applied rows are wrong
# (or missing) for that xid. Examples take turns by kind, so a flood of one kind
# does not hide the others.
# TODO(xid wraparound): matching is on the 32-bit xid pgoutput carries, so after
# 2^32 transactions two source transactions can share one and hide each other.
# TODO(partial application): an applied row's `events` is not compared with the
# store's count for that xid; a half-applied transaction shows only through
# projection_matches_store.
SQL_APPLIED_ONCE = f"""
WITH src AS (
    SELECT mod(txid::text::bigint, {XID_MODULUS}) AS xid, count(*) AS events,
           min(transaction_id::text) AS transaction_id
    FROM events WHERE position > %(start)s GROUP BY txid
),
app AS (
    SELECT xid, count(*) AS times,
           string_agg(commit_lsn::text, ' ' ORDER BY commit_lsn) AS lsns
    FROM cdc_applied WHERE slot_name = %(slot)s AND events > 0 GROUP BY xid
),
diff AS (
    SELECT coalesce(s.xid, a.xid) AS xid, s.events, s.transaction_id, a.times,
           a.lsns,
           CASE WHEN a.xid IS NULL THEN 0 WHEN s.xid IS NULL THEN 1 ELSE 2 END AS kind
    FROM src s FULL JOIN app a ON a.xid = s.xid
    WHERE a.xid IS NULL OR s.xid IS NULL OR a.times > 1
),
bad AS (
    SELECT 'xid ' || xid AS subject,
           CASE kind
               WHEN 0 THEN 'committed with ' || events || ' event(s), transaction '
                           || transaction_id || ', never applied'
               WHEN 1 THEN 'applied at ' || lsns || ', not in the event store'
               ELSE 'applied ' || times || ' times, at ' || lsns
           END AS detail,
           kind,
           CASE kind WHEN 0 THEN 1 WHEN 1 THEN times ELSE times - 1 END AS weight,
           ARRAY[row_number() OVER (PARTITION BY kind ORDER BY xid), kind, xid]
               AS ord
    FROM diff
),
{_SAMPLE}
SELECT (SELECT count(*) FROM src), (SELECT coalesce(sum(times), 0) FROM app),
       (SELECT coalesce(sum(weight) FILTER (WHERE kind = 0), 0) FROM bad),
       (SELECT coalesce(sum(weight) FILTER (WHERE kind = 1), 0) FROM bad),
       (SELECT coalesce(sum(weight) FILTER (WHERE kind = 2), 0) FROM bad),
       subjects, details
FROM sample
"""

SQL_TOTALS = """
SELECT (SELECT coalesce(sum(balance), 0) FROM account_projections),
       (SELECT coalesce(sum(delta), 0) FROM events)
"""

SQL_TRANSFERS = f"""
WITH transfers AS (
    SELECT transaction_id, sum(delta) AS net,
           count(*) FILTER (WHERE event_type = 'TransferDebited') AS debits,
           count(*) FILTER (WHERE event_type = 'TransferCredited') AS credits
    FROM events
    WHERE event_type IN ('TransferDebited', 'TransferCredited')
    GROUP BY transaction_id
),
bad AS (
    SELECT 'transaction ' || transaction_id AS subject,
           debits || ' debit(s), ' || credits || ' credit(s), net ' || net AS detail,
           transaction_id AS ord
    FROM transfers
    WHERE net <> 0 OR debits <> 1 OR credits <> 1
),
{_SAMPLE}
SELECT (SELECT count(*) FROM bad), (SELECT count(*) FROM transfers),
       subjects, details
FROM sample
"""

SQL_NEGATIVE = f"""
WITH bad AS (
    SELECT 'account ' || account_id AS subject,
           'projection balance ' || balance AS detail,
           ARRAY[account_id, 0] AS ord
    FROM account_projections WHERE balance < 0
    UNION ALL
    SELECT 'account ' || account_id, 'head balance ' || balance,
           ARRAY[account_id, 1]
    FROM accounts WHERE balance < 0
),
{_SAMPLE}
SELECT (SELECT count(*) FROM bad), (SELECT count(*) FROM account_projections),
       (SELECT count(*) FROM accounts), subjects, details
FROM sample
"""

SQL_PROJECTIONS_OF = (
    "SELECT account_id, balance, version FROM account_projections"
    " WHERE account_id = ANY(%s)"
)

SQL_LAG = """
SELECT count(*),
       percentile_cont(0.50) WITHIN GROUP (ORDER BY lag_ms),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY lag_ms),
       percentile_cont(0.99) WITHIN GROUP (ORDER BY lag_ms),
       max(lag_ms)
FROM (
    SELECT (extract(epoch FROM applied_at - commit_ts) * 1000)::float8 AS lag_ms
    FROM cdc_applied WHERE slot_name = %s AND events > 0
) AS l
"""


def _fetch(conn: Conn, query: str, params: dict[str, Any]) -> tuple[Any, ...]:
    row = conn.execute(query, params).fetchone()
    # The statements end in aggregates without GROUP BY: there is always a row.
    assert row is not None
    return tuple(row)


def _examples(subjects: list[str] | None, details: list[str] | None) -> list[Example]:
    return [Example(s, d) for s, d in zip(subjects or [], details or [], strict=True)]


def _projection_matches(conn: Conn, sample: int) -> Check:
    bad, accounts, subjects, details = _fetch(
        conn, SQL_PROJECTION_MATCHES, {"sample": sample}
    )
    if bad:
        text = f"{bad} of {accounts} accounts in the event store differ from their"
        text += " projection or have none"
    else:
        text = f"all {accounts} accounts in the event store are projected with"
        text += " their balance and version"
    return Check(
        "projection_matches_store",
        text,
        int(bad),
        tuple(_examples(subjects, details)),
    )


def _no_orphan(conn: Conn, sample: int) -> Check:
    bad, total, subjects, details = _fetch(conn, SQL_NO_ORPHAN, {"sample": sample})
    if bad:
        text = f"{bad} of {total} projections are of accounts with no events"
    else:
        text = f"all {total} projections are of accounts with events"
    return Check(
        "no_orphan_projection", text, int(bad), tuple(_examples(subjects, details))
    )


def _applied_once(conn: Conn, slot: str, sample: int) -> Check:
    name = "transactions_applied_once"
    checkpoint = projections.load_checkpoint(conn, slot)
    if checkpoint is None:
        return Check(
            name,
            f"slot {slot} has no row in cdc_checkpoint, so what it should have"
            " applied is unknown: was the slot started with start_checkpoint?",
            1,
            (),
        )

    row = _fetch(
        conn,
        SQL_APPLIED_ONCE,
        {"start": checkpoint.start_position, "slot": slot, "sample": sample},
    )
    committed, applied, missing, extra, repeated, subjects, details = row
    violations = int(missing) + int(extra) + int(repeated)
    text = (
        f"{committed} transactions committed after position"
        f" {checkpoint.start_position}, {applied} applied by slot {slot}"
    )
    if violations:
        text += (
            f"; {missing} never applied, {extra} applied but not in the event"
            f" store, {repeated} extra applications of a transaction"
        )
    return Check(name, text, violations, tuple(_examples(subjects, details)))


def _money_conserved(conn: Conn, sample: int) -> Check:
    projected, stored = _fetch(conn, SQL_TOTALS, {})
    bad, transfers, subjects, details = _fetch(conn, SQL_TRANSFERS, {"sample": sample})

    examples: list[Example] = []
    if projected != stored:
        examples.append(
            Example("total", f"projections hold {projected}, events sum to {stored}")
        )
    examples.extend(_examples(subjects, details))
    text = f"projections hold {projected}, events sum to {stored};"
    if bad:
        text += f" {bad} of {transfers} transfers are not one debit and one credit"
        text += " netting to zero"
    else:
        text += f" all {transfers} transfers are one debit and one credit netting"
        text += " to zero"
    return Check(
        "money_conserved",
        text,
        int(bad) + (projected != stored),
        tuple(examples[:sample]),
    )


def _no_negative(conn: Conn, sample: int) -> Check:
    bad, projected, heads, subjects, details = _fetch(
        conn, SQL_NEGATIVE, {"sample": sample}
    )
    text = f"{bad} negative balances among {projected} projections and {heads}"
    text += " account heads"
    return Check(
        "no_negative_balance", text, int(bad), tuple(_examples(subjects, details))
    )


def _cache(conn: Conn, client: redis.Redis | None, prefix: str, sample: int) -> Check:
    name = "cache_matches_projection"
    if client is None:
        return Check(name, "the cache could not be read: no Redis client", 1, ())
    try:
        read, violations, examples = _scan_cache(conn, client, prefix, sample)
    except redis.RedisError as exc:
        logger.warning("cache under %r could not be read: %s", prefix, exc)
        return Check(name, f"the cache could not be read: {exc}", 1, ())

    text = f"{read} cached accounts under {prefix!r}"
    if violations:
        text += f", {violations} differ from their projection or have none"
    else:
        text += ", all equal to their projection"
    return Check(name, text, violations, tuple(examples))


_DECIMAL = re.compile(r"-?[0-9]+")
_ACCOUNT_ID = re.compile(r"[0-9]+")


def _scan_cache(
    conn: Conn, client: redis.Redis, prefix: str, sample: int
) -> tuple[int, int, list[Example]]:
    """Compare every cached account with its projection, a SCAN batch at a time.

    Redis is read live, outside the database snapshot: on a system that is not
    drained, entries written meanwhile show up as differences.

    Return the entries read, the violations and the first `sample` of them by
    account id. Raise `redis.RedisError` if Redis fails on the way.
    """
    pattern = _glob_escape(prefix) + "*"
    # SCAN may return a key more than once; each must be judged once.
    seen: set[str] = set()
    found: list[tuple[int, str, Example]] = []
    read = violations = batches = 0
    cursor = 0
    while True:
        cursor, raw_keys = client.scan(cursor, match=pattern, count=SCAN_BATCH)
        keys = [k for k in map(_text, raw_keys) if k is not None and k not in seen]
        seen.update(keys)
        if keys:
            batches += 1
            entries, malformed = _read_batch(client, keys, prefix)
            differing = _compare(conn, entries)
            found.extend(malformed)
            found.extend(differing)
            read += len(entries) + len(malformed)
            violations += len(malformed) + len(differing)
            # Keep only what can still be among the first `sample`.
            if len(found) > 10 * max(sample, 1):
                found = heapq.nsmallest(sample, found, key=_order)
            logger.debug("cache: %s keys read in %s batches", read, batches)
        if int(cursor) == 0:
            break

    first = heapq.nsmallest(sample, found, key=_order)
    return read, violations, [example for _, _, example in first]


def _order(item: tuple[int, str, Example]) -> tuple[int, str]:
    return item[0], item[1]


def _read_batch(
    client: redis.Redis, keys: Sequence[str], prefix: str
) -> tuple[dict[int, tuple[int, int]], list[tuple[int, str, Example]]]:
    """HMGET a batch of keys in one round trip; split good entries from bad ones.

    An entry that expired between SCAN and HMGET is absent, which is allowed.
    """
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hmget(key, ["balance", "version"])
    # Per-command errors (a key that is not a hash) come back as values.
    results = pipe.execute(raise_on_error=False)

    entries: dict[int, tuple[int, int]] = {}
    bad: list[tuple[int, str, Example]] = []
    for key, result in zip(keys, results, strict=True):
        suffix = key[len(prefix) :]
        account_id = int(suffix) if _ACCOUNT_ID.fullmatch(suffix) else -1
        subject = f"account {account_id}" if account_id >= 0 else f"key {key}"
        if isinstance(result, Exception):
            bad.append((account_id, key, Example(subject, f"unreadable: {result}")))
            continue
        balance, version = (_text(v) for v in result)
        if balance is None and version is None:
            continue
        if (
            account_id < 0
            or balance is None
            or version is None
            or not _DECIMAL.fullmatch(balance)
            or not _DECIMAL.fullmatch(version)
        ):
            detail = f"malformed entry: balance {balance!r} version {version!r}"
            bad.append((account_id, key, Example(subject, detail)))
            continue
        entries[account_id] = (int(balance), int(version))
    return entries, bad


def _compare(
    conn: Conn, entries: dict[int, tuple[int, int]]
) -> list[tuple[int, str, Example]]:
    if not entries:
        return []
    rows = conn.execute(SQL_PROJECTIONS_OF, (list(entries),)).fetchall()
    projected = {int(r[0]): (int(r[1]), int(r[2])) for r in rows}
    bad: list[tuple[int, str, Example]] = []
    for account_id, (balance, version) in entries.items():
        want = projected.get(account_id)
        if want == (balance, version):
            continue
        detail = f"cached balance {balance} version {version}, "
        if want is None:
            detail += "no projection"
        else:
            detail += f"projection balance {want[0]} version {want[1]}"
        bad.append((account_id, "", Example(f"account {account_id}", detail)))
    return bad


def _text(value: bytes | str | None) -> str | None:
    # The client may or may not decode responses.
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _glob_escape(text: str) -> str:
    # SCAN MATCH is a glob: a prefix with * ? [ ] or \ must match only itself.
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _lag(conn: Conn, slot: str) -> LagStats:
    row = conn.execute(SQL_LAG, (slot,)).fetchone()
    assert row is not None
    count, p50, p95, p99, top = row
    return LagStats(
        count=int(count),
        p50_ms=_float(p50),
        p95_ms=_float(p95),
        p99_ms=_float(p99),
        max_ms=_float(top),
    )


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def render(report: Report) -> list[str]:
    """Format a report as aligned text lines: one row per check, then the lag."""
    rows = [
        (
            c.name,
            str(c.violations),
            "pass" if c.passed else "FAIL",
            ", ".join(e.subject for e in c.examples),
        )
        for c in report.checks
    ]
    header = ("check", "violations", "result", "examples")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [
        f"{n:<{widths[0]}}  {v:>{widths[1]}}  {r:<{widths[2]}}  {e}".rstrip()
        for n, v, r, e in [header, *rows]
    ]
    for c in report.checks:
        if not c.passed:
            lines.append(f"{c.name}: {c.description}")
            lines.extend(f"  {e.subject}: {e.detail}" for e in c.examples)
    lag = report.lag
    if lag.count:
        lines.append(
            f"lag over {lag.count} applied transactions: p50 {lag.p50_ms:.1f} ms,"
            f" p95 {lag.p95_ms:.1f} ms, p99 {lag.p99_ms:.1f} ms,"
            f" max {lag.max_ms:.1f} ms"
        )
    else:
        lines.append("lag: no transactions applied")
    lines.append(
        f"slot {report.slot}: " + ("all checks passed" if report.passed else "FAILED")
    )
    return lines


def to_dict(report: Report) -> dict[str, Any]:
    """Return the report as plain JSON-ready data."""
    return {
        "slot": report.slot,
        "passed": report.passed,
        "elapsed_s": round(report.elapsed_s, 3),
        "lag": {
            "count": report.lag.count,
            "p50_ms": report.lag.p50_ms,
            "p95_ms": report.lag.p95_ms,
            "p99_ms": report.lag.p99_ms,
            "max_ms": report.lag.max_ms,
        },
        "checks": [
            {
                "name": c.name,
                "passed": c.passed,
                "violations": c.violations,
                "description": c.description,
                "examples": [
                    {"subject": e.subject, "detail": e.detail} for e in c.examples
                ],
            }
            for c in report.checks
        ],
    }


def write_json(report: Report, path: str | os.PathLike[str] = REPORT_PATH) -> Path:
    """Write the report as JSON at `path`, creating its folder; return the path.

    The file is replaced whole, so a reader never sees half a report. Raise
    OSError if the folder cannot be created or the file written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".tmp")
    partial.write_text(json.dumps(to_dict(report), indent=2) + "\n", encoding="utf-8")
    os.replace(partial, target)
    logger.info("wrote verification report %s", target)
    return target
