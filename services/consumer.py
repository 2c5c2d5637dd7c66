"""The CDC consumer: logical decoding of the event store into projections and Redis.

One process, one slot. Its loop reads committed source transactions from the slot,
applies up to `projection_store.batch_size` of them per projection transaction with
the checkpoint in that same transaction, hands the touched accounts and the lags to
the cache writer, and only then confirms the position to the slot. A crash anywhere
(kill -9 included) leaves either the old checkpoint, so the transactions come again
and are applied, or the new one, so they come again and are skipped: at-least-once
delivery, exactly-once effect.

The consumer runs without gevent: a plain process whose only other thread is the
cache writer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
import redis

from services import cache as cache_mod
from services import logs, projections, replication, schema
from services.config import Profile
from services.errors import CdcLoadError, ServiceUnavailable
from services.histogram import Histogram
from services.pgoutput import format_lsn, parse_lsn
from services.pool import Conn, Pool, application_name
from services.procstats import peak_rss_kib
from services.projections import Checkpoint

logger = logs.get("cdc")

#: How long one read waits for the slot when nothing arrives, in seconds.
READ_TIMEOUT_S = 0.05
#: Seconds between rate lines in the log.
LOG_INTERVAL_S = 10.0
#: The table a drain inserts a barrier into; published beside the events.
MARKERS_TABLE = "cdc_markers"


@dataclass
class ConsumerStats:
    """What the consumer did since it started."""

    transactions: int = 0
    skipped: int = 0
    events: int = 0
    batches: int = 0
    lag: Histogram = field(default_factory=Histogram)
    late: int = 0
    max_backlog_bytes: int = 0
    max_retained_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


def prepare(conn: Conn, profile: Profile) -> tuple[Checkpoint, bool]:
    """Create what the consumer needs if missing; return its checkpoint.

    The second value tells whether the slot was created now. A slot made now starts
    a fresh checkpoint: what it missed before it existed is not its to deliver.
    """
    cdc = profile.cdc
    level = conn.execute("SHOW wal_level").fetchone()
    if level is None or level[0] != "logical":
        found = level[0] if level else "unknown"
        raise ServiceUnavailable(
            f"wal_level is {found}; logical decoding needs wal_level=logical"
            " (ALTER SYSTEM SET wal_level = logical, then restart the server)"
        )
    schema.create(conn)
    projections.create(conn)
    replication.ensure_publication(
        conn, cdc.publication_name, ("events", MARKERS_TABLE)
    )
    created = replication.ensure_slot(conn, cdc.slot_name)
    checkpoint = projections.load_checkpoint(conn, cdc.slot_name)
    if created or checkpoint is None:
        checkpoint = projections.start_checkpoint(conn, cdc.slot_name)
    logger.info(
        "slot %s %s, publication %s, checkpoint %s (%s applied)",
        cdc.slot_name,
        "created" if created else "reused",
        cdc.publication_name,
        format_lsn(checkpoint.commit_lsn),
        checkpoint.applied_transactions,
    )
    return checkpoint, created


class Consumer:
    """Reads one slot and keeps the projections and the cache up to date."""

    def __init__(self, profile: Profile, *, process: str | None = None) -> None:
        self.profile = profile
        self.slot = profile.cdc.slot_name
        self.stats = ConsumerStats()
        self.pool = Pool(
            profile.database.url,
            profile.projection_store.pool,
            role="consumer",
            process=process,
        )
        self.redis = cache_mod.client(
            profile.redis.url, max_connections=min(4, profile.redis.max_connections)
        )
        self.cache = cache_mod.AccountCache(self.redis, profile.cache)
        self.writer = cache_mod.CacheWriter(self.cache, slot=self.slot)
        self.reader: replication.SlotReader | None = None
        self.checkpoint: Checkpoint | None = None
        self._process = process
        self._last_status = 0.0
        self._last_log = time.monotonic()
        self._logged_tx = 0

    # Lifecycle.

    def start(self) -> None:
        """Prepare the slot, warm the cache and open the reader.

        Raise `ServiceUnavailable` if the server lacks logical decoding.
        """
        self.pool.open()
        with self.pool.connection() as conn:
            self.checkpoint, _ = prepare(conn, self.profile)
            self._warm(conn)
        self.writer.start()
        self.reader = self._open_reader()

    def _open_reader(self) -> replication.SlotReader:
        cdc = self.profile.cdc
        name = application_name("cdc", self._process)
        kind: Any = (
            replication.StreamSlotReader
            if cdc.reader == "stream"
            else replication.SqlSlotReader
        )
        reader: replication.SlotReader = kind(
            self.profile.database.url,
            cdc.slot_name,
            cdc.publication_name,
            application_name=name,
        )
        logger.info("reading slot %s with the %s reader", cdc.slot_name, cdc.reader)
        return reader

    def _warm(self, conn: Conn) -> None:
        def progress(done: int, total: int) -> None:
            logger.info("cache warm-up: %s of %s accounts", done, total)

        started = time.monotonic()
        try:
            loaded = self.cache.warm(conn, progress=progress)
        except redis.RedisError as exc:
            # The cache is derived data: the writer fills it once Redis answers.
            logger.warning("cache warm-up skipped, redis unavailable: %s", exc)
            return
        logger.info(
            "cache warm-up: %s accounts in %.2f s, batches of %s",
            loaded,
            time.monotonic() - started,
            self.profile.cache.warmup_batch_size,
        )

    def run(self, stop: threading.Event) -> ConsumerStats:
        """Consume until `stop` is set, then close everything; return the totals.

        Re-raise a failure of the cache writer; raise `OrderViolation` if the slot
        ever delivers an account's events out of version order.
        """
        if self.reader is None:
            self.start()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.close()
        return self.stats

    def step(self) -> int:
        """Read what the slot has, apply it, confirm it; return transactions read."""
        assert self.reader is not None and self.checkpoint is not None
        if self.writer.failure is not None:
            raise CdcLoadError("the cache writer died") from self.writer.failure
        txs = self.reader.read(timeout_s=READ_TIMEOUT_S)
        size = self.profile.projection_store.batch_size
        for start in range(0, len(txs), size):
            self._apply(txs[start : start + size])
        now = time.monotonic()
        if now - self._last_status >= self.profile.cdc.status_interval:
            self._last_status = now
            self._report_status()
        if now - self._last_log >= LOG_INTERVAL_S:
            self._log_rate(now)
        return len(txs)

    def _apply(self, chunk: list[replication.SourceTransaction]) -> None:
        assert self.reader is not None and self.checkpoint is not None
        with self.pool.connection() as conn:
            applied = projections.apply(
                conn, self.slot, chunk, self.checkpoint.commit_lsn
            )
        if applied.checkpoint is not None:
            self.checkpoint = applied.checkpoint
        limit_ms = self.profile.cdc.max_lag * 1000
        for lag in applied.lags_ms:
            self.stats.lag.add(lag)
            if lag > limit_ms:
                self.stats.late += 1
        self.stats.transactions += applied.transactions
        self.stats.skipped += applied.skipped
        self.stats.events += applied.events
        self.stats.batches += 1
        if applied.skipped:
            logger.info(
                "skipped %s transactions applied before a restart", applied.skipped
            )
        # The projections are committed: the cache may follow, then the slot.
        self.writer.offer(applied.accounts, applied.lags_ms, self.checkpoint.end_lsn)
        self.reader.confirm(chunk[-1].end_lsn)

    def _report_status(self) -> None:
        assert self.checkpoint is not None
        try:
            with self.pool.connection() as conn:
                state = replication.slot_state(conn, self.slot)
        except (psycopg.Error, CdcLoadError) as exc:
            logger.warning("cannot read the state of slot %s: %s", self.slot, exc)
            return
        if state is None:
            return
        s = self.stats
        s.max_backlog_bytes = max(s.max_backlog_bytes, state.backlog_bytes)
        s.max_retained_bytes = max(s.max_retained_bytes, state.retained_bytes)
        if state.backlog_bytes > self.profile.cdc.backlog_warn_bytes:
            logger.warning(
                "slot %s is %s bytes behind (warns past %s); %s bytes of WAL retained",
                self.slot,
                state.backlog_bytes,
                self.profile.cdc.backlog_warn_bytes,
                state.retained_bytes,
            )
        lag = s.lag.summary()
        self.writer.offer(
            [],
            [],
            self.checkpoint.end_lsn,
            status={
                "checkpoint_lsn": str(self.checkpoint.commit_lsn),
                "checkpoint": format_lsn(self.checkpoint.commit_lsn),
                "applied_transactions": str(self.checkpoint.applied_transactions),
                "backlog_bytes": str(state.backlog_bytes),
                "retained_bytes": str(state.retained_bytes),
                "lag_p50_ms": str(lag["p50"]),
                "lag_p99_ms": str(lag["p99"]),
                "cache_failures": str(self.writer.stats.failures),
                "pid": str(self._process or ""),
            },
        )

    def _log_rate(self, now: float) -> None:
        assert self.checkpoint is not None
        done = self.stats.transactions - self._logged_tx
        rate = done / (now - self._last_log)
        lag = self.stats.lag.summary()
        logger.info(
            "applied %s transactions (%.0f/s), lag p50 %.1f ms p99 %.1f ms,"
            " checkpoint %s, cache pending %s",
            done,
            rate,
            lag["p50"],
            lag["p99"],
            format_lsn(self.checkpoint.commit_lsn),
            self.writer.pending,
        )
        self._last_log = now
        self._logged_tx = self.stats.transactions

    def close(self) -> None:
        """Close the reader (confirming what was applied), the writer and the pool."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        self.writer.close()
        try:
            with self.pool.connection() as conn:
                state = replication.slot_state(conn, self.slot)
        except (psycopg.Error, CdcLoadError):
            state = None
        self.pool.close()
        self.redis.close()
        s = self.stats
        lag = s.lag.summary()
        logger.info(
            "consumer stopped: %s transactions, %s events, %s skipped, lag p50 %.1f ms"
            " p99 %.1f ms max %.1f ms, %s late, peak rss %s KiB",
            s.transactions,
            s.events,
            s.skipped,
            lag["p50"],
            lag["p99"],
            lag["max"],
            s.late,
            peak_rss_kib(),
        )
        if state is not None:
            logger.info(
                "slot %s: confirmed %s, restart %s, backlog %s bytes, retained %s",
                state.slot,
                format_lsn(state.confirmed_flush_lsn),
                format_lsn(state.restart_lsn),
                state.backlog_bytes,
                state.retained_bytes,
            )


def drain(profile: Profile, *, timeout_s: float | None = None) -> dict[str, Any]:
    """Wait until the consumer has applied everything committed before this call.

    Insert a marker after noting the WAL position; once the slot's checkpoint passes
    that position, every earlier transaction has been applied (the slot delivers
    in commit order), and once the cache writer has flushed past it too, the cache
    holds them. Log progress while waiting. Raise `CdcLoadError` on timeout.
    """
    from services import setup

    limit = timeout_s if timeout_s is not None else profile.cdc.drain_timeout
    slot = profile.cdc.slot_name
    client = cache_mod.client(profile.redis.url, max_connections=1)
    started = time.monotonic()
    try:
        with setup.connect(profile.database.url, "drain") as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
            assert row is not None
            target = parse_lsn(str(row[0]))
            conn.execute(f"INSERT INTO {MARKERS_TABLE} DEFAULT VALUES")
            last_log = 0.0
            while True:
                checkpoint = projections.load_checkpoint(conn, slot)
                applied = checkpoint.commit_lsn if checkpoint else 0
                cache_lsn = _cache_lsn(client, slot)
                elapsed = time.monotonic() - started
                if applied >= target and cache_lsn >= target:
                    logger.info(
                        "drained: slot %s applied past %s in %.2f s",
                        slot,
                        format_lsn(target),
                        elapsed,
                    )
                    return {
                        "target_lsn": format_lsn(target),
                        "seconds": round(elapsed, 3),
                        "applied_transactions": checkpoint.applied_transactions
                        if checkpoint
                        else 0,
                    }
                if elapsed > limit:
                    raise CdcLoadError(
                        f"slot {slot} did not catch up in {limit:g} s: applied"
                        f" {format_lsn(applied)}, cache {format_lsn(cache_lsn)},"
                        f" target {format_lsn(target)}; is `cdc-load consumer` running?"
                    )
                if elapsed - last_log >= 2.0:
                    last_log = elapsed
                    logger.info(
                        "draining: %s bytes to apply, cache at %s, %.0f s of %g",
                        max(0, target - applied),
                        format_lsn(cache_lsn),
                        elapsed,
                        limit,
                    )
                time.sleep(0.02)
    finally:
        client.close()


def _cache_lsn(client: Any, slot: str) -> int:
    try:
        value = client.hget(cache_mod.status_key(slot), "cache_lsn")
    except redis.RedisError:
        return 0
    return int(value) if value else 0
