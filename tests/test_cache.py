"""The write-through cache: layout, TTL, size bound by shards, warm-up batches."""

from __future__ import annotations

import math
import time
from typing import Any

import psycopg

from services import cache
from services.config import CacheSettings


def settings(**changes: Any) -> CacheSettings:
    base = {"ttl": 300.0, "max_size": 40, "shard_count": 4, "warmup_batch_size": 7}
    return CacheSettings(**{**base, **changes})


def test_entries_are_hashes_with_balance_version_and_ttl(redis_client: Any) -> None:
    c = cache.AccountCache(redis_client, settings(ttl=120.0))
    c.write([(7, 1500, 3)])
    assert redis_client.hgetall("cdc:account:7") == {"balance": "1500", "version": "3"}
    assert 0 < redis_client.ttl("cdc:account:7") <= 120
    assert c.read(7) == (1500, 3)
    assert c.read(8) is None


def test_max_size_bounds_each_shard_and_evicts_the_oldest(redis_client: Any) -> None:
    c = cache.AccountCache(redis_client, settings(max_size=40, shard_count=4))
    assert c.cap_per_shard == 10
    evicted = 0
    for account in range(1, 201):
        evicted += c.write([(account, account, 1)])
    keys = list(redis_client.scan_iter(match="cdc:account:*"))
    assert len(keys) == 40
    assert evicted == 160
    for shard in range(4):
        assert redis_client.zcard(f"cdc:lru:{shard}") == 10
    # The newest of each shard stay; the first ones written are gone.
    assert c.read(200) is not None
    assert c.read(1) is None


def test_shard_count_splits_the_index(redis_client: Any) -> None:
    for shards in (1, 3, 16):
        cache.forget(redis_client)
        c = cache.AccountCache(
            redis_client, settings(max_size=1000, shard_count=shards)
        )
        c.write([(a, 1, 1) for a in range(1, 101)])
        indexes = sorted(redis_client.scan_iter(match="cdc:lru:*"))
        assert len(indexes) == shards
        assert sum(redis_client.zcard(k) for k in indexes) == 100


def test_warm_up_loads_in_batches_of_warmup_batch_size(
    conn: psycopg.Connection[Any], redis_client: Any
) -> None:
    conn.execute(
        "INSERT INTO account_projections (account_id, balance, version, updated_at)"
        " SELECT g, g * 10, 1, now() - g * interval '1 second'"
        " FROM generate_series(1, 30) AS g"
    )
    calls: list[tuple[int, int]] = []
    c = cache.AccountCache(redis_client, settings(max_size=25, warmup_batch_size=7))
    loaded = c.warm(conn, progress=lambda done, total: calls.append((done, total)))
    assert loaded == 25
    assert calls == [(7, 25), (14, 25), (21, 25), (25, 25)]
    assert len(calls) == math.ceil(25 / 7)
    # The most recently updated come first: account 1 is the newest.
    assert c.read(1) == (10, 1)
    assert c.read(30) is None


def test_writer_holds_back_while_redis_is_down(redis_client: Any) -> None:
    dead = cache.client("redis://127.0.0.1:1/0", max_connections=1)
    writer = cache.CacheWriter(cache.AccountCache(dead, settings()), slot="cdc_load_t")
    writer.start()
    try:
        writer.offer([(1, 10, 1)], [5.0], lsn=100)
        writer.offer([(1, 20, 2), (2, 5, 1)], [6.0], lsn=200)
        deadline = time.monotonic() + 5
        while writer.stats.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert writer.stats.failures >= 1
        assert writer.stats.redis_up is False
        # Nothing is lost while Redis is away: the newest value of each account.
        assert writer.pending == 2
        assert writer.stats.writes == 0
    finally:
        writer.close(timeout=2)
