"""CDC propagation as Locust requests, read from the consumer's Redis stream.

The consumer is another process (often another machine). It publishes the lag of
every applied source transaction to a capped Redis stream and its state (backlog,
retained WAL, checkpoint) to a hash. The process that owns the test (the local
runner or the master) reads both: each lag becomes a request of type `CDC` named
`propagation`, so percentiles show live in the UI and land in the CSV and HTML
reports; a lag past `cdc.max_lag` is a failure (`PropagationLate`).
"""

from __future__ import annotations

import time
from typing import Any

import gevent
import redis
from locust.env import Environment

from services import cache, logs
from services.config import Profile
from services.errors import CdcLoadError

logger = logs.get("cdcfeed")

REQUEST_TYPE = "CDC"
NAME = "propagation"
#: How long one XREAD waits for new entries, in milliseconds.
BLOCK_MS = 200
#: Stream entries read per call (each carries one batch of lags).
READ_COUNT = 100


class PropagationLate(CdcLoadError):
    """A source transaction reached the projections later than `cdc.max_lag`."""


class CdcFeed:
    """A greenlet that turns the consumer's lag stream into Locust requests."""

    def __init__(self, environment: Environment, profile: Profile) -> None:
        self.environment = environment
        self.profile = profile
        self.stream = cache.lag_stream(profile.cdc.slot_name)
        self.status_key = cache.status_key(profile.cdc.slot_name)
        # Any: with decode_responses the replies are str, which redis-py's types
        # cannot express.
        self.client: Any = cache.client(profile.redis.url, max_connections=2)
        self.last_id = "$"
        self.status: dict[str, str] = {}
        self.samples = 0
        self.late = 0
        self.errors = 0
        self.history: list[dict[str, float]] = []
        self._greenlet: gevent.Greenlet[Any, Any] | None = None
        self._running = False

    def start(self) -> None:
        """Start reading from the newest entry on."""
        try:
            # Only what this test produces: start after the stream's last entry.
            last = self.client.xrevrange(self.stream, count=1)
            self.last_id = last[0][0] if last else "0-0"
        except redis.RedisError as exc:
            logger.warning("cannot read the lag stream %s: %s", self.stream, exc)
            self.last_id = "0-0"
        self._running = True
        self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        """Stop reading (after the read in progress) and close the Redis client."""
        self._running = False
        if self._greenlet is not None:
            self._greenlet.join(timeout=2 + BLOCK_MS / 1000)
            self._greenlet.kill(block=True, timeout=2)
            self._greenlet = None
        self.client.close()

    def catch_up(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything in the stream now has been read; tell if it was."""
        try:
            last = self.client.xrevrange(self.stream, count=1)
        except redis.RedisError:
            return False
        if not last:
            return True
        target = _id(last[0][0])
        deadline = time.monotonic() + timeout_s
        while _id(self.last_id) < target:
            if time.monotonic() > deadline:
                return False
            gevent.sleep(0.05)
        return True

    def _run(self) -> None:
        last_status = 0.0
        while self._running:
            try:
                replies = self.client.xread(
                    {self.stream: self.last_id}, count=READ_COUNT, block=BLOCK_MS
                )
                for _stream, entries in replies or []:
                    for entry_id, fields in entries:
                        self._emit(fields)
                        self.last_id = entry_id
                now = time.monotonic()
                if now - last_status >= self.profile.cdc.status_interval:
                    last_status = now
                    self._read_status()
            except redis.RedisError as exc:
                self.errors += 1
                if self.errors == 1 or self.errors % 50 == 0:
                    logger.warning(
                        "lag stream unavailable (%s times): %s", self.errors, exc
                    )
                gevent.sleep(0.5)

    def _emit(self, fields: dict[str, str]) -> None:
        limit_ms = self.profile.cdc.max_lag * 1000
        fire = self.environment.events.request.fire
        for text in fields.get("lags", "").split(","):
            if not text:
                continue
            lag = float(text)
            late = lag > limit_ms
            self.samples += 1
            self.late += late
            fire(
                request_type=REQUEST_TYPE,
                name=NAME,
                response_time=lag,
                response_length=0,
                exception=PropagationLate() if late else None,
                context={},
            )

    def _read_status(self) -> None:
        status = self.client.hgetall(self.status_key)
        if not status:
            return
        self.status = dict(status)
        point = {"t": time.time()}
        for key in ("backlog_bytes", "retained_bytes", "lag_p50_ms", "lag_p99_ms"):
            if key in status:
                point[key] = float(status[key])
        self.history.append(point)
        # A long test samples once per interval: keep the last hour at most.
        del self.history[:-3600]


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
