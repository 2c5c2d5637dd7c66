"""Measure the capture lag of both slot readers under a steady write rate.

For each reader in turn: create a fresh slot, start writer threads that commit
small transactions (one insert into events each) at a fixed total rate, and
consume with the reader in the main thread, confirming each batch. Lag is taken
on one clock, the server's: right after a read returns a batch, one round trip
fetches `clock_timestamp()`, and each transaction's lag is that time minus its
pgoutput commit time. The round trip itself is included (its median is
reported). Transactions committed during the warm-up are left out.

    .venv/bin/python -m scripts.measure_capture --rate 1500 --seconds 20

Uses the database `cdc_helper_a` on the server of DATABASE_URL, and slots and a
publication named `cdc_load_ha_measure*`, all dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from scripts import helper_db
from services import logs
from services.replication import (
    SlotReader,
    SqlSlotReader,
    StreamSlotReader,
    drop_slot,
    ensure_publication,
    ensure_slot,
    slot_state,
)

logger = logs.get("cdc")

PUBLICATION = "cdc_load_ha_measure"
#: Default total commit rate of the writers, in transactions per second.
RATE_TPS = 1_500.0
#: Default length of the write phase of each run, in seconds.
DURATION_S = 20.0
#: Commits at the start of each run left out of the lag figures, in seconds.
WARMUP_S = 2.0
#: Writer threads sharing the rate; one is enough unless commits are slow.
WRITERS = 2
#: How long the reader may take to catch up once writing stopped, in seconds.
DRAIN_TIMEOUT_S = 60.0
CLOCK_US = "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint"


@dataclass
class Writers:
    """Threads committing one event a transaction at a shared, steady rate."""

    url: str
    rate_tps: float
    duration_s: float
    threads: int
    committed: int = 0
    behind_max_s: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    errors: list[BaseException] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        """Start the threads; each commits every `threads / rate` seconds."""
        self.started = time.monotonic()
        base = time.time_ns() // 1000 % 10**12 * 1000
        for index in range(self.threads):
            worker = threading.Thread(
                target=self._run, args=(index, base + index), daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def join(self) -> None:
        """Wait for the threads; re-raise the first error one of them hit."""
        for worker in self._workers:
            worker.join()
        if self.errors:
            raise self.errors[0]

    def writing(self) -> bool:
        """Tell whether any thread is still writing."""
        return any(worker.is_alive() for worker in self._workers)

    def _run(self, index: int, account: int) -> None:
        try:
            with psycopg.connect(
                self.url, autocommit=True, application_name="cdc-load-cdc-measure"
            ) as conn:
                self._write(conn, index, account)
        except BaseException as ex:
            self.errors.append(ex)

    def _write(self, conn: psycopg.Connection[Any], index: int, account: int) -> None:
        interval = self.threads / self.rate_tps
        due = self.started + index / self.rate_tps
        end = self.started + self.duration_s
        version = 0
        while due < end:
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                self.behind_max_s = max(self.behind_max_s, now - due)
            version += 1
            conn.execute(
                "INSERT INTO events"
                " (account_id, version, event_type, delta, transaction_id)"
                " VALUES (%s, %s, 'Deposited', 1, %s)",
                (account, version, uuid.uuid4()),
            )
            with self._lock:
                self.committed += 1
                self.finished = max(self.finished, time.monotonic())
            due += interval


@dataclass
class Result:
    """What one reader's run measured."""

    kind: str
    lags_ms: list[float]
    transactions: int
    written: int
    batches: int
    round_trip_ms: float
    achieved_tps: float
    writer_behind_ms: float
    backend_cpu_s: float | None
    backlog_bytes: int
    retained_bytes: int


def _percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _application_name(kind: str) -> str:
    return f"cdc-load-cdc-measure-{kind}"


def _open(kind: str, url: str, slot: str) -> SlotReader:
    name = _application_name(kind)
    if kind == "sql":
        return SqlSlotReader(url, slot, PUBLICATION, application_name=name)
    return StreamSlotReader(url, slot, PUBLICATION, application_name=name)


def _backend_cpu_s(admin: psycopg.Connection[Any], kind: str) -> float | None:
    # The server process that decodes for the reader (a backend for the SQL
    # reader, a walsender for the stream); readable only when the server runs
    # on this machine.
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
        (_application_name(kind),),
    ).fetchone()
    if row is None:
        return None
    try:
        with open(f"/proc/{row[0]}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return None
    # utime and stime, the 14th and 15th fields, in clock ticks.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, url: str, args: argparse.Namespace) -> Result:
    """Run the writers against a fresh slot read by the reader `kind`."""
    slot = f"{PUBLICATION}_{kind}"
    with psycopg.connect(url, autocommit=True) as admin:
        drop_slot(admin, slot)
        ensure_slot(admin, slot)
        try:
            return _run(kind, url, slot, admin, args)
        finally:
            drop_slot(admin, slot)


def _run(
    kind: str,
    url: str,
    slot: str,
    admin: psycopg.Connection[Any],
    args: argparse.Namespace,
) -> Result:
    writers = Writers(url, args.rate, args.seconds, args.writers)
    lags_ms: list[float] = []
    round_trips: list[float] = []
    received = batches = 0
    with (
        psycopg.connect(url, autocommit=True) as clock,
        _open(kind, url, slot) as reader,
    ):
        writers.start()
        warm_until_us = time.time_ns() // 1000 + int(args.warmup * 1_000_000)
        drain_deadline = time.monotonic() + args.seconds + DRAIN_TIMEOUT_S
        while time.monotonic() < drain_deadline:
            batch = reader.read(timeout_s=0.5)
            if not batch:
                if not writers.writing() and received >= writers.committed:
                    break
                continue
            sent = time.perf_counter()
            row = clock.execute(CLOCK_US).fetchone()
            round_trips.append((time.perf_counter() - sent) * 1000)
            assert row is not None
            now_us = int(row[0])
            for transaction in batch:
                if transaction.commit_time_us >= warm_until_us:
                    lags_ms.append((now_us - transaction.commit_time_us) / 1000)
            received += len(batch)
            batches += 1
            reader.confirm(batch[-1].end_lsn)
        writers.join()
        state = slot_state(admin, slot)
        cpu_s = _backend_cpu_s(admin, kind)
    elapsed = writers.finished - writers.started
    return Result(
        kind=kind,
        lags_ms=lags_ms,
        transactions=received,
        written=writers.committed,
        batches=batches,
        round_trip_ms=statistics.median(round_trips) if round_trips else 0.0,
        achieved_tps=writers.committed / elapsed,
        writer_behind_ms=writers.behind_max_s * 1000,
        backend_cpu_s=cpu_s,
        backlog_bytes=state.backlog_bytes,
        retained_bytes=state.retained_bytes,
    )


def _report(result: Result) -> str:
    lags = result.lags_ms
    if not lags:
        return f"{result.kind}: no transactions after the warm-up"
    cpu = "n/a" if result.backend_cpu_s is None else f"{result.backend_cpu_s:.1f} s"
    return (
        f"{result.kind:>6}: lag p50 {_percentile(lags, 0.50):7.2f} ms"
        f"  p90 {_percentile(lags, 0.90):7.2f}"
        f"  p99 {_percentile(lags, 0.99):7.2f}"
        f"  max {max(lags):7.2f} ms"
        f" | {result.transactions}/{result.written} tx"
        f" at {result.achieved_tps:.0f} tx/s"
        f", {result.transactions / max(result.batches, 1):.1f} tx/batch"
        f", clock rtt {result.round_trip_ms:.2f} ms"
        f", writers late by {result.writer_behind_ms:.0f} ms at most"
        f", decoding backend cpu {cpu}"
        f" | backlog {result.backlog_bytes} B, retained {result.retained_bytes} B"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, measure each reader in turn and print one line each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="server URL; default DATABASE_URL")
    parser.add_argument("--rate", type=float, default=RATE_TPS, help="tx/s")
    parser.add_argument("--seconds", type=float, default=DURATION_S)
    parser.add_argument("--warmup", type=float, default=WARMUP_S)
    parser.add_argument("--writers", type=int, default=WRITERS)
    parser.add_argument("--readers", default="stream,sql", help="comma-separated")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logs.configure(args.log_level)

    url = helper_db.ensure(args.url)
    with psycopg.connect(url, autocommit=True) as conn:
        ensure_publication(conn, PUBLICATION)

    print(
        f"writing {args.rate:.0f} tx/s for {args.seconds:.0f} s"
        f" from {args.writers} threads, warm-up {args.warmup:.0f} s"
    )
    try:
        for kind in args.readers.split(","):
            print(_report(measure(kind.strip(), url, args)), flush=True)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
