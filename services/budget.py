"""The connection budget of a whole test, and each process's share of it.

A profile's pool sizes, permits and `target_ops` are for the whole test, however
many Locust workers run it: the master splits them, and each worker sizes its pools
from its share. So adding workers spreads the same connections thinner instead of
multiplying them, which is how the baseline team exhausted their server.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from services.config import PoolSettings, Profile

#: Connections of the test's own tools beside the pools: the consumer's replication
#: stream; the connection sampler, and one short-lived connection for setup, and one
#: for drain or verification (they run one after the other).
REPLICATION_CONNECTIONS = 1
TOOL_CONNECTIONS = 3


def share(total: int, index: int, workers: int) -> int:
    """Split `total` over `workers`; the first `total % workers` get one more."""
    base, extra = divmod(total, workers)
    return base + (1 if index < extra else 0)


def _pool_share(pool: PoolSettings, workers: int) -> PoolSettings:
    top = max(1, pool.max_size // workers)
    low = min(top, math.ceil(pool.min_size / workers))
    return dataclasses.replace(pool, max_size=top, min_size=low)


def per_process(profile: Profile, workers: int) -> Profile:
    """Return the profile one of `workers` processes runs with.

    Pools, permits, Redis connections and group-commit writers are divided (at
    least one each); the consumer's projection pool is not, as there is one
    consumer whatever the number of workers.
    """
    if workers <= 1:
        return profile
    es = profile.event_store
    return dataclasses.replace(
        profile,
        database=dataclasses.replace(
            profile.database, pool=_pool_share(profile.database.pool, workers)
        ),
        event_store=dataclasses.replace(
            es,
            pool=_pool_share(es.pool, workers),
            batch_processor_count=max(1, es.batch_processor_count // workers),
        ),
        in_flight=dataclasses.replace(
            profile.in_flight, permits=max(1, profile.in_flight.permits // workers)
        ),
        redis=dataclasses.replace(
            profile.redis,
            max_connections=max(1, profile.redis.max_connections // workers),
        ),
    )


@dataclass(frozen=True)
class ConnectionPlan:
    """What a test may hold at once against what the server allows."""

    parts: tuple[tuple[str, int], ...]
    needed: int
    reserved: int
    max_connections: int

    @property
    def available(self) -> int:
        """Connections the server gives to ordinary roles."""
        return self.max_connections - self.reserved

    @property
    def fits(self) -> bool:
        """Whether every pool at its maximum fits at once."""
        return self.needed <= self.available

    def describe(self) -> str:
        """The arithmetic in one line."""
        terms = " + ".join(f"{n} {name}" for name, n in self.parts)
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"{terms} = {self.needed} connections; the server allows"
            f" {self.max_connections} - {self.reserved} reserved = {self.available}:"
            f" {verdict}"
        )


def plan(
    profile: Profile, *, workers: int, max_connections: int, reserved: int
) -> ConnectionPlan:
    """Sum every pool's maximum over all processes, plus the tools' connections."""
    users = per_process(profile, workers)
    parts: list[tuple[str, int]] = [
        (
            f"users ({workers} x {users.database.pool.max_size})",
            workers * users.database.pool.max_size,
        ),
    ]
    if profile.event_store.write_path == "batched":
        each = users.event_store.pool.max_size
        parts.append((f"writers ({workers} x {each})", workers * each))
    parts += [
        ("consumer", profile.projection_store.pool.max_size),
        ("replication", REPLICATION_CONNECTIONS),
        ("sampler, setup, drain or verify", TOOL_CONNECTIONS),
    ]
    return ConnectionPlan(
        parts=tuple(parts),
        needed=sum(n for _, n in parts),
        reserved=reserved,
        max_connections=max_connections,
    )
