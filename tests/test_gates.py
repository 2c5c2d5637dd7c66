"""The gates in front of the database: breaker, utilization pause, permits, budget.

The breaker and the pause are driven by a fake clock, so their timing is exact; the
limiter and the budget are exercised by real greenlets.
"""

from __future__ import annotations

import random
import time

import gevent
import gevent.pool
import pytest

from services.config import BreakerSettings, InFlightSettings, UtilizationPauseSettings
from services.errors import BreakerOpen, SemaphoreTimeout
from services.gates import CircuitBreaker, InFlightLimiter, OpBudget, UtilizationPause


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def breaker(
    clock: FakeClock, *, threshold: int = 3, pause: float = 5.0, enabled: bool = True
) -> CircuitBreaker:
    settings = BreakerSettings(
        enabled=enabled, failure_threshold=threshold, pause=pause
    )
    return CircuitBreaker(settings, clock=clock)


def test_breaker_trips_after_exactly_the_threshold() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=3)

    cb.record(failed=True)
    cb.record(failed=True)
    assert not cb.is_open()
    cb.check()

    cb.record(failed=True)
    assert cb.is_open()
    assert cb.trips == 1
    assert cb.paused_s == 5.0
    with pytest.raises(BreakerOpen):
        cb.check()


def test_breaker_success_resets_the_streak() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=3)

    for _ in range(5):
        cb.record(failed=True)
        cb.record(failed=True)
        cb.record(failed=False)

    assert cb.trips == 0
    assert cb.consecutive == 0
    assert not cb.is_open()


def test_breaker_disabled_never_trips() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=1, enabled=False)

    for _ in range(100):
        cb.record(failed=True)

    assert cb.trips == 0
    assert not cb.is_open()
    cb.check()


def test_breaker_stays_open_for_the_pause_then_lets_through() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=2, pause=5.0)
    cb.record(failed=True)
    cb.record(failed=True)

    clock.advance(4.9)
    assert cb.remaining() == pytest.approx(0.1)
    with pytest.raises(BreakerOpen):
        cb.check()

    clock.advance(0.1)
    assert cb.remaining() == 0.0
    cb.check()
    assert cb.trips == 1


def test_breaker_half_open_retrips_on_first_failure_after_pause() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=4, pause=2.0)
    for _ in range(4):
        cb.record(failed=True)
    clock.advance(2.0)
    cb.check()

    cb.record(failed=True)

    assert cb.trips == 2
    assert cb.paused_s == 4.0
    with pytest.raises(BreakerOpen):
        cb.check()


def test_breaker_failures_while_open_do_not_extend_it() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=2, pause=3.0)
    cb.record(failed=True)
    cb.record(failed=True)
    opened_until = cb.open_until

    # Operations already in flight when it opened still report their failures.
    clock.advance(1.0)
    for _ in range(10):
        cb.record(failed=True)

    assert cb.trips == 1
    assert cb.open_until == opened_until
    assert cb.paused_s == 3.0


def test_breaker_success_after_pause_closes_it_fully() -> None:
    clock = FakeClock()
    cb = breaker(clock, threshold=3, pause=1.0)
    for _ in range(3):
        cb.record(failed=True)
    clock.advance(1.0)

    cb.record(failed=False)
    cb.record(failed=True)
    cb.record(failed=True)

    assert cb.trips == 1
    assert not cb.is_open()


def pause_gate(
    clock: FakeClock,
    *,
    threshold: float = 0.8,
    pause: float = 1.0,
    enabled: bool = True,
) -> UtilizationPause:
    settings = UtilizationPauseSettings(
        enabled=enabled, threshold=threshold, pause=pause
    )
    return UtilizationPause(settings, clock=clock)


def test_utilization_pause_only_above_threshold() -> None:
    clock = FakeClock()
    gate = pause_gate(clock, threshold=0.8)

    for utilization in (0.1, 0.5, 0.8):
        gate.observe(utilization)

    assert gate.pauses == 0
    assert gate.remaining() == 0.0
    assert gate.peak_utilization == 0.8

    gate.observe(0.81)
    assert gate.pauses == 1
    assert gate.peak_utilization == 0.81


def test_utilization_pause_lasts_the_configured_time() -> None:
    clock = FakeClock()
    gate = pause_gate(clock, pause=1.5)
    gate.observe(0.95)

    assert gate.remaining() == pytest.approx(1.5)
    clock.advance(1.0)
    assert gate.remaining() == pytest.approx(0.5)

    # Still paused: a high reading does not start a second pause.
    gate.observe(1.0)
    assert gate.pauses == 1

    clock.advance(0.5)
    assert gate.remaining() == 0.0
    gate.observe(0.9)
    assert gate.pauses == 2
    assert gate.paused_s == pytest.approx(3.0)
    assert gate.peak_utilization == 1.0


def test_utilization_pause_disabled_records_peak_only() -> None:
    clock = FakeClock()
    gate = pause_gate(clock, enabled=False)

    gate.observe(1.0)

    assert gate.pauses == 0
    assert gate.remaining() == 0.0
    assert gate.peak_utilization == 1.0


def test_limiter_bounds_concurrent_holders() -> None:
    limiter = InFlightLimiter(InFlightSettings(permits=3, acquire_timeout=5.0))
    holders = 0
    most = 0

    def work() -> None:
        nonlocal holders, most
        limiter.acquire()
        try:
            holders += 1
            most = max(most, holders)
            gevent.sleep(0.01)
            holders -= 1
        finally:
            limiter.release()

    group = gevent.pool.Group()
    for _ in range(30):
        group.spawn(work)
    group.join(raise_error=True)

    assert most == 3
    assert limiter.peak == 3
    assert limiter.in_flight == 0
    assert limiter.timeouts == 0


def test_limiter_times_out() -> None:
    limiter = InFlightLimiter(InFlightSettings(permits=1, acquire_timeout=0.1))
    limiter.acquire()

    started = time.monotonic()
    with pytest.raises(SemaphoreTimeout):
        limiter.acquire()
    waited = time.monotonic() - started

    assert 0.09 <= waited < 0.5
    assert limiter.timeouts == 1
    limiter.release()
    limiter.acquire()
    assert limiter.in_flight == 1


def test_limiter_without_timeout_waits_for_a_permit() -> None:
    limiter = InFlightLimiter(InFlightSettings(permits=1, acquire_timeout=None))
    limiter.acquire()

    waiter = gevent.spawn(limiter.acquire)
    gevent.sleep(0.3)
    assert not waiter.ready()

    limiter.release()
    waiter.join(timeout=1.0)
    assert waiter.successful()
    assert limiter.in_flight == 1
    assert limiter.timeouts == 0


def test_budget_grants_exactly_its_limit_and_fires_once() -> None:
    fired: list[int] = []
    budget = OpBudget(25)
    budget.on_done = lambda: fired.append(budget.finished)
    granted = 0

    def user() -> None:
        nonlocal granted
        while budget.claim():
            granted += 1
            gevent.sleep(random.uniform(0, 0.01))
            budget.finish()

    group = gevent.pool.Group()
    for _ in range(50):
        group.spawn(user)
    group.join(raise_error=True)

    assert granted == 25
    assert budget.claimed == 25
    assert budget.exhausted
    assert fired == [25]


def test_budget_waits_for_the_last_finish() -> None:
    fired: list[bool] = []
    budget = OpBudget(2, on_done=lambda: fired.append(True))

    assert budget.claim()
    assert budget.claim()
    assert not budget.claim()
    assert budget.exhausted

    budget.finish()
    assert fired == []
    budget.finish()
    assert fired == [True]
