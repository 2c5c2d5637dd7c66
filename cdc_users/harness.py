"""Everything one Locust process holds for the account workload.

A `Harness` is made per test run (on `test_start`) in every process that runs users
(the local runner or a worker). It owns the pools, the event store, the group
committer, the gates and the operation budget, and closes all of them on
`test_stop`. The master never opens a pool: it only sets accounts up.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from services import cache, logs, projections
from services.config import Profile
from services.errors import OperationFailure
from services.eventstore import (
    Command,
    EventStore,
    Outcome,
    existing_accounts,
)
from services.gates import CircuitBreaker, InFlightLimiter, OpBudget, UtilizationPause
from services.groupcommit import GroupCommitter
from services.pool import Pool, PoolStats
from services.procstats import peak_rss_kib

logger = logs.get("harness")

#: After a Redis error, balance reads skip the cache for this long, in seconds, so
#: a Redis that hangs costs one socket timeout per interval, not one per read.
CACHE_BACKOFF_S = 1.0


@dataclass
class Counters:
    """Per-process numbers the summary prints; sent to the master by workers."""

    trips: int = 0
    breaker_open: bool = False
    breaker_paused_s: float = 0.0
    utilization_pauses: int = 0
    utilization_paused_s: float = 0.0
    peak_utilization: float = 0.0
    timeouts: int = 0
    semaphore_timeouts: int = 0
    pool_timeouts: int = 0
    conflicts_retried: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    cache_errors: int = 0
    projection_misses: int = 0
    connection_errors: int = 0
    peak_rss_kib: int = 0
    #: The group-commit writers' totals (batched path only).
    batches: int = 0
    batched_commands: int = 0
    largest_batch: int = 0
    expired_in_queue: int = 0
    final_pools: list[dict[str, Any]] = field(default_factory=list)


class Harness:
    """The pools, store and gates of one process for one test run."""

    def __init__(
        self, profile: Profile, *, budget: int, process: str, overcommit: bool = False
    ) -> None:
        self.profile = profile
        self.process = process
        self.overcommit = overcommit
        self.breaker = CircuitBreaker(profile.circuit_breaker)
        self.pause = UtilizationPause(profile.utilization_pause)
        self.limiter = InFlightLimiter(profile.in_flight)
        self.budget = OpBudget(budget)
        self.pool = Pool(
            profile.database.url,
            profile.database.pool,
            role="users",
            process=process,
        )
        self.store = EventStore(
            self.pool,
            write_deadline_s=profile.deadlines.write,
            read_deadline_s=profile.deadlines.read,
            conflict_attempts=profile.event_store.conflict_attempts,
        )
        self.committer: GroupCommitter | None = None
        self.writer_pool: Pool | None = None
        if profile.event_store.write_path == "batched":
            self.writer_pool = Pool(
                profile.database.url,
                profile.event_store.pool,
                role="writers",
                process=process,
            )
            self.committer = GroupCommitter(
                self.writer_pool,
                batch_size=profile.event_store.batch_size,
                writers=profile.event_store.batch_processor_count,
                queue_size=profile.workload.channel_buffer_size,
                write_deadline_s=profile.deadlines.write,
            )
        self.redis = cache.client(
            profile.redis.url, max_connections=profile.redis.max_connections
        )
        self.cache = cache.AccountCache(self.redis, profile.cache)
        self._cache_down_until = 0.0
        self.accounts: list[int] = []
        self.counters = Counters()
        self.closed = False

    def start(self) -> None:
        """Open the pools, load the account ids and start the writers."""
        # Overcommitted on purpose, the minimum may never be reached: go on with
        # what opens, and count what the server refuses.
        self.pool.open(wait=not self.overcommit)
        if self.writer_pool is not None:
            self.writer_pool.open(wait=not self.overcommit)
        with self.pool.connection() as conn:
            self.accounts = existing_accounts(conn, self.profile.workload.account_count)
        if len(self.accounts) < 2:
            raise OperationFailure(
                f"only {len(self.accounts)} accounts exist; setup must run first"
            )
        if self.committer is not None:
            self.committer.start()

    def write(self, cmd: Command) -> Outcome:
        """Run a write command on the profile's write path.

        The direct path holds an in-flight permit around the command. The batched
        path takes none: a queued command holds no connection, and the queue of
        `channel_buffer_size` bounds it; a permit per queued command would cap
        every batch at the number of permits (20 in the optimized profile).
        """
        if self.committer is not None:
            return self.committer.submit(cmd)
        with self.limiter:
            return self.store.execute(cmd)

    def read_balance(self, account_id: int) -> str:
        """Read a balance from the cache, else from the projection.

        Return the request type of the store that answered (`REDIS` or `PG`). An
        account not projected yet is read from the event store's head. Raise
        `UnknownAccount` if no store has it, `OperationTimeout` past the read
        deadline, `SemaphoreTimeout` if no in-flight permit comes. A Redis error
        is counted and falls back to PostgreSQL.
        """
        with self.limiter:
            return self._read_balance(account_id)

    def _read_balance(self, account_id: int) -> str:
        c = self.counters
        if time.monotonic() >= self._cache_down_until:
            try:
                if self.cache.read(account_id) is not None:
                    c.cache_hits += 1
                    return "REDIS"
            except redis.RedisError as exc:
                c.cache_errors += 1
                self._cache_down_until = time.monotonic() + CACHE_BACKOFF_S
                logger.debug("cache read failed, reading the projection: %s", exc)
        c.cache_misses += 1
        if self.store.read(lambda conn: projections.read(conn, account_id)) is None:
            # Not projected yet (the consumer is behind, or restarting): the event
            # store's head answers, as a read of one's own writes would.
            c.projection_misses += 1
            self.store.balance(account_id)
        return "PG"

    def pick(self) -> int:
        """Pick an account at random from the shared set."""
        return random.choice(self.accounts)

    def pick_pair(self) -> tuple[int, int]:
        """Pick two different accounts."""
        a, b = random.sample(self.accounts, 2)
        return a, b

    def amount(self) -> int:
        """Pick an amount in minor units, from 1 to the profile's maximum."""
        return random.randint(1, self.profile.workload.max_amount)

    def utilization(self) -> float:
        """Pool utilization now; the larger of the users' and writers' pools."""
        if self.writer_pool is None:
            return self.pool.utilization
        return max(self.pool.utilization, self.writer_pool.utilization)

    def pool_stats(self) -> list[PoolStats]:
        """Snapshots of this process's pools."""
        pools = [self.pool] + ([self.writer_pool] if self.writer_pool else [])
        return [p.stats() for p in pools]

    def snapshot(self) -> Counters:
        """Gather the counters of the gates and pools into `counters`."""
        c = self.counters
        c.trips = self.breaker.trips
        c.breaker_open = self.breaker.is_open()
        c.breaker_paused_s = self.breaker.paused_s
        c.utilization_pauses = self.pause.pauses
        c.utilization_paused_s = self.pause.paused_s
        c.peak_utilization = max(
            self.pause.peak_utilization,
            *(s.peak_utilization for s in self.pool_stats()),
        )
        c.semaphore_timeouts = self.limiter.timeouts
        c.pool_timeouts = sum(s.timeouts for s in self.pool_stats())
        c.conflicts_retried = self.store.conflicts_retried
        c.connection_errors = sum(s.connection_errors for s in self.pool_stats())
        c.peak_rss_kib = peak_rss_kib()
        self._snapshot_batches()
        return c

    def _snapshot_batches(self) -> None:
        if self.committer is None:
            return
        c, stats = self.counters, self.committer.stats
        c.batches = stats.batches
        c.batched_commands = stats.commands
        c.largest_batch = stats.largest_batch
        c.expired_in_queue = stats.expired

    def close(self) -> None:
        """Stop the writers and close the pools, logging their final state."""
        if self.closed:
            return
        self.closed = True
        self.snapshot()
        started = time.monotonic()
        if self.committer is not None:
            self.committer.close()
            # What the writers committed while they were being stopped.
            self._snapshot_batches()
        finals = [self.pool.close()]
        if self.writer_pool is not None:
            finals.append(self.writer_pool.close())
        self.counters.final_pools = [
            {"name": s.name, "size": s.size, "idle": s.idle, "peak": s.peak_in_use}
            for s in finals
        ]
        self.redis.close()
        logger.info("harness closed in %.2f s", time.monotonic() - started)
