"""The account cache in Redis, written through by the CDC consumer.

Layout (documented in the README; outside readers rely on it):

- `cdc:account:<account_id>`: a hash with fields `balance` and `version` (decimal
  strings), expiring after `cache.ttl`;
- `cdc:lru:<shard>`: a sorted set per shard (`account_id % cache.shard_count`) of
  cached account ids scored by the time they were written. Each shard holds at most
  `ceil(max_size / shard_count)` entries; writing past that evicts the oldest of
  that shard, so the cache never holds more than about `max_size` accounts. More
  shards make each eviction index smaller and eviction finer-grained;
- `cdc:lag:<slot>`: a stream of propagation lags (a bounded channel to Locust);
- `cdc:consumer:<slot>`: a hash with the consumer's state (checkpoint, backlog).

The consumer never waits on Redis: `CacheWriter` coalesces the latest value of each
account in memory (bounded by the number of accounts) and writes from its own
thread. While Redis is down, writes fail, are counted and kept; when it returns,
everything touched meanwhile is written, and the cache is coherent again.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services import logs
from services.config import CacheSettings
from services.pool import Conn

logger = logs.get("cache")

KEY_PREFIX = "cdc:account:"
SHARD_PREFIX = "cdc:lru:"
#: Lag samples kept while Redis is unreachable; older ones are dropped (counted).
LAG_BUFFER = 100_000
#: Entries the lag stream keeps (approximately, as Redis trims by whole nodes).
LAG_STREAM_MAXLEN = 10_000
#: Seconds between attempts while Redis does not answer.
RETRY_S = 0.5
#: Socket timeouts for the consumer's Redis client, in seconds: a hung Redis may
#: hold up only the cache thread, and only this long per attempt.
SOCKET_TIMEOUT_S = 0.5

# Trim one shard to its cap: pop the oldest ids and delete their hashes, in one
# round trip with the writes.
_TRIM = """
local excess = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
if excess <= 0 then return 0 end
local popped = redis.call('ZPOPMIN', KEYS[1], excess)
for i = 1, #popped, 2 do redis.call('DEL', ARGV[2] .. popped[i]) end
return excess
"""

Entry = tuple[int, int, int]  # account_id, balance, version


def lag_stream(slot: str) -> str:
    """Name the Redis stream that carries a slot's propagation lags."""
    return f"cdc:lag:{slot}"


def status_key(slot: str) -> str:
    """Name the Redis hash that carries a slot consumer's state."""
    return f"cdc:consumer:{slot}"


def client(url: str, *, max_connections: int) -> redis.Redis:
    """Make a Redis client with a bounded pool and short timeouts."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        # No retries inside redis-py: its default backs off for seconds on a dead
        # server, and every caller here has its own answer to a failure.
        retry=Retry(NoBackoff(), 0),
        max_connections=max_connections,
        timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        decode_responses=True,
    )
    return redis.Redis(connection_pool=pool)


def forget(client: redis.Redis, *, pattern: str = "cdc:*") -> int:
    """Delete every key of ours (cache, indexes, lag streams, status); count them."""
    deleted = 0
    batch: list[str] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch = []
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


class AccountCache:
    """Read and write cached accounts with the profile's TTL, size and shards."""

    def __init__(
        self,
        client: redis.Redis,
        settings: CacheSettings,
        *,
        key_prefix: str = KEY_PREFIX,
        shard_prefix: str = SHARD_PREFIX,
    ) -> None:
        self.client = client
        self.settings = settings
        self.key_prefix = key_prefix
        self.shard_prefix = shard_prefix
        self.cap_per_shard = math.ceil(settings.max_size / settings.shard_count)
        self._trim = client.register_script(_TRIM)

    def key(self, account_id: int) -> str:
        """The hash key of an account."""
        return f"{self.key_prefix}{account_id}"

    def shard_key(self, account_id: int) -> str:
        """The LRU index an account belongs to."""
        return f"{self.shard_prefix}{account_id % self.settings.shard_count}"

    def write(
        self, entries: Iterable[Entry], *, extra: Callable[..., None] | None = None
    ) -> int:
        """Write entries, trim their shards, and return how many were evicted.

        `extra(pipeline)` may queue more commands in the same round trip. Raise
        `redis.RedisError` when Redis does not answer; nothing is retried here.
        """
        ttl = max(1, round(self.settings.ttl))
        now = time.time()
        shards: set[str] = set()
        pipe = self.client.pipeline(transaction=False)
        for account_id, balance, version in entries:
            key = self.key(account_id)
            pipe.hset(key, mapping={"balance": balance, "version": version})
            pipe.expire(key, ttl)
            shard = self.shard_key(account_id)
            pipe.zadd(shard, {str(account_id): now})
            shards.add(shard)
        trims: list[int] = []
        for shard in sorted(shards):
            pipe.expire(shard, ttl)
            trims.append(len(pipe))
            self._trim(
                keys=[shard], args=[self.cap_per_shard, self.key_prefix], client=pipe
            )
        if extra is not None:
            extra(pipe)
        results = pipe.execute()
        return sum(int(results[i]) for i in trims)

    def read(self, account_id: int) -> tuple[int, int] | None:
        """Return (balance, version) of a cached account, or None on a miss."""
        values = self.client.hmget(self.key(account_id), ["balance", "version"])
        if values[0] is None or values[1] is None:
            return None
        return int(values[0]), int(values[1])

    def warm(
        self,
        conn: Conn,
        *,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Load the most recently updated projections, up to `max_size`.

        Reads and writes in batches of `warmup_batch_size`, calling
        `progress(done, total)` after each; return the number loaded.
        """
        total_row = conn.execute(
            "SELECT least(count(*), %s) FROM account_projections",
            (self.settings.max_size,),
        ).fetchone()
        total = int(total_row[0]) if total_row else 0
        done = 0
        batch = self.settings.warmup_batch_size
        with conn.cursor(name="cdc_cache_warmup") as cur, conn.transaction():
            cur.itersize = batch
            cur.execute(
                "SELECT account_id, balance, version FROM account_projections"
                " ORDER BY updated_at DESC LIMIT %s",
                (self.settings.max_size,),
            )
            while True:
                rows = cur.fetchmany(batch)
                if not rows:
                    break
                self.write((int(r[0]), int(r[1]), int(r[2])) for r in rows)
                done += len(rows)
                if progress is not None:
                    progress(done, total)
        return done


@dataclass
class WriterStats:
    """What the cache writer did since it started."""

    writes: int = 0
    flushes: int = 0
    failures: int = 0
    evicted: int = 0
    lags_sent: int = 0
    lags_dropped: int = 0
    flushed_lsn: int = 0
    redis_up: bool = True


class CacheWriter:
    """Write cache entries, lag samples and status from a thread of its own."""

    def __init__(self, cache: AccountCache, *, slot: str) -> None:
        self.cache = cache
        self.slot = slot
        self.stats = WriterStats()
        self._pending: dict[int, tuple[int, int]] = {}
        self._lags: collections.deque[float] = collections.deque(maxlen=LAG_BUFFER)
        self._status: dict[str, str] = {}
        self._lsn = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(
            target=self._run, name="cache-writer", daemon=True
        )
        self.failure: BaseException | None = None

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def offer(
        self,
        entries: Iterable[Entry],
        lags_ms: Iterable[float],
        lsn: int,
        status: dict[str, str] | None = None,
    ) -> None:
        """Queue the latest account values and lag samples; never wait on Redis."""
        with self._cond:
            for account_id, balance, version in entries:
                self._pending[account_id] = (balance, version)
            for lag in lags_ms:
                if len(self._lags) == self._lags.maxlen:
                    self.stats.lags_dropped += 1
                self._lags.append(lag)
            if status:
                self._status.update(status)
            self._lsn = max(self._lsn, lsn)
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Flush what is pending (if Redis answers) and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def pending(self) -> int:
        """Accounts waiting to be written."""
        return len(self._pending)

    def _take(
        self,
    ) -> tuple[dict[int, tuple[int, int]], list[float], dict[str, str], int]:
        with self._cond:
            while not (
                self._pending
                or self._lags
                or self._status
                or self._stop
                or self._lsn > self.stats.flushed_lsn
            ):
                self._cond.wait(1.0)
            pending, self._pending = self._pending, {}
            lags = list(self._lags)
            self._lags.clear()
            status, self._status = self._status, {}
            return pending, lags, status, self._lsn

    def _put_back(
        self,
        pending: dict[int, tuple[int, int]],
        lags: list[float],
        status: dict[str, str],
    ) -> None:
        with self._cond:
            for account_id, value in pending.items():
                newer = self._pending.get(account_id)
                if newer is None or newer[1] < value[1]:
                    self._pending[account_id] = value
            room = LAG_BUFFER - len(self._lags)
            self.stats.lags_dropped += max(0, len(lags) - room)
            self._lags.extendleft(reversed(lags[-room:] if room > 0 else []))
            self._status = {**status, **self._status}

    def _run(self) -> None:
        try:
            while True:
                pending, lags, status, lsn = self._take()
                if pending or lags or status or lsn > self.stats.flushed_lsn:
                    self._flush(pending, lags, status, lsn)
                with self._cond:
                    if self._stop and not (self.stats.redis_up and self._pending):
                        return
        except BaseException as exc:  # stored for the consumer to re-raise
            self.failure = exc
            logger.error("cache writer stopped: %r", exc)
            raise

    def _flush(
        self,
        pending: dict[int, tuple[int, int]],
        lags: list[float],
        status: dict[str, str],
        lsn: int,
    ) -> None:
        entries = [(a, b, v) for a, (b, v) in pending.items()]

        def extra(pipe: redis.client.Pipeline) -> None:
            if lags:
                pipe.xadd(
                    lag_stream(self.slot),
                    {"lags": ",".join(f"{x:.2f}" for x in lags)},
                    maxlen=LAG_STREAM_MAXLEN,
                    approximate=True,
                )
            fields = {
                **status,
                "cache_lsn": str(lsn),
                "updated_at": f"{time.time():.3f}",
            }
            pipe.hset(status_key(self.slot), mapping=fields)  # type: ignore[arg-type]

        try:
            self.stats.evicted += self.cache.write(entries, extra=extra)
        except redis.RedisError as exc:
            self._put_back(pending, lags, status)
            self.stats.failures += 1
            if self.stats.redis_up:
                logger.warning("redis unavailable, cache writes held back: %s", exc)
            self.stats.redis_up = False
            with self._cond:
                if self._stop:
                    return
            time.sleep(RETRY_S)
            return
        if not self.stats.redis_up:
            logger.info("redis back: wrote %s accounts held back", len(entries))
        self.stats.redis_up = True
        self.stats.writes += len(entries)
        self.stats.flushes += 1
        self.stats.lags_sent += len(lags)
        self.stats.flushed_lsn = lsn
