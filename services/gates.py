"""What stands between a user and the database: breaker, pause, permits, budget.

These are plain objects with a clock; `cdc_users.hooks` feeds them Locust's request
events and asks them before every operation. Waiting is done with `time.sleep` and
gevent's own primitives in a gevent process (see `services.green`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services import green, logs
from services.config import BreakerSettings, InFlightSettings, UtilizationPauseSettings
from services.errors import BreakerOpen, SemaphoreTimeout

logger = logs.get("gates")

Clock = Callable[[], float]


class CircuitBreaker:
    """Open after `failure_threshold` consecutive system failures, for `pause` s.

    Business rejections (overdraft and the like) are not failures of the system
    and neither count nor reset the streak. While open, operations are refused with
    `BreakerOpen`; after the pause the next operation runs, and a failure of it
    opens the breaker again at once (half-open).
    """

    def __init__(
        self, settings: BreakerSettings, clock: Clock = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.consecutive = 0
        self.trips = 0
        self.open_until = 0.0
        self.paused_s = 0.0
        self._half_open = False

    def record(self, failed: bool) -> None:
        """Count the outcome of one operation that reached the system."""
        if not self.settings.enabled:
            return
        if not failed:
            self.consecutive = 0
            self._half_open = False
            return
        self.consecutive += 1
        if self._half_open or self.consecutive >= self.settings.failure_threshold:
            self._trip()

    def _trip(self) -> None:
        now = self.clock()
        if now < self.open_until:
            return
        self.trips += 1
        self.open_until = now + self.settings.pause
        self.paused_s += self.settings.pause
        self._half_open = True
        logger.warning(
            "circuit breaker open for %g s after %s consecutive failures (trip %s)",
            self.settings.pause,
            self.consecutive,
            self.trips,
        )
        self.consecutive = 0

    def is_open(self) -> bool:
        """Tell whether operations are being refused now."""
        return self.clock() < self.open_until

    def check(self) -> None:
        """Raise `BreakerOpen` while open."""
        if self.is_open():
            left = self.open_until - self.clock()
            raise BreakerOpen(f"circuit breaker open for {left:.1f} s more")

    def remaining(self) -> float:
        """Seconds until the breaker lets operations through again."""
        return max(0.0, self.open_until - self.clock())


class UtilizationPause:
    """Hold new operations for `pause` s once pool utilization passes a threshold."""

    def __init__(
        self, settings: UtilizationPauseSettings, clock: Clock = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.pauses = 0
        self.paused_s = 0.0
        self.peak_utilization = 0.0
        self.until = 0.0

    def observe(self, utilization: float) -> None:
        """Feed the utilization seen at the end of an operation."""
        self.peak_utilization = max(self.peak_utilization, utilization)
        if not self.settings.enabled or utilization <= self.settings.threshold:
            return
        now = self.clock()
        if now < self.until:
            return
        self.pauses += 1
        self.until = now + self.settings.pause
        self.paused_s += self.settings.pause
        logger.warning(
            "pool utilization %.2f above %.2f: pausing new operations for %g s",
            utilization,
            self.settings.threshold,
            self.settings.pause,
        )

    def remaining(self) -> float:
        """Seconds new operations still have to wait."""
        return max(0.0, self.until - self.clock())


class InFlightLimiter:
    """A semaphore on database work, with the profile's acquire timeout."""

    def __init__(self, settings: InFlightSettings) -> None:
        self.settings = settings
        self._sem = green.semaphore(settings.permits)
        self.timeouts = 0
        self.in_flight = 0
        self.peak = 0

    def acquire(self) -> None:
        """Take a permit; raise `SemaphoreTimeout` if none comes in time."""
        timeout = self.settings.acquire_timeout
        if not self._sem.acquire(timeout=timeout):
            self.timeouts += 1
            raise SemaphoreTimeout(
                f"no in-flight permit of {self.settings.permits} in {timeout:g} s"
            )
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def release(self) -> None:
        """Give a permit back."""
        self.in_flight -= 1
        self._sem.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class OpBudget:
    """Exactly `limit` operations: a ticket is claimed before each one starts.

    `on_done` runs once, when the last claimed operation has finished and no ticket
    is left.
    """

    limit: int
    on_done: Callable[[], None] | None = None
    claimed: int = 0
    finished: int = 0
    _fired: bool = False

    def claim(self) -> bool:
        """Take a ticket for one operation; False when none is left."""
        if self.claimed >= self.limit:
            return False
        self.claimed += 1
        return True

    def finish(self) -> None:
        """Mark one claimed operation as finished."""
        self.finished += 1
        if self.finished >= self.limit and not self._fired:
            self._fired = True
            if self.on_done is not None:
                self.on_done()

    @property
    def exhausted(self) -> bool:
        """True once every ticket has been claimed."""
        return self.claimed >= self.limit
