"""A fixed-memory latency histogram: 2% wide buckets, any number of samples.

The consumer records every propagation lag of a long run; keeping them all would
grow without bound, and a 2% bucket is finer than anything a percentile here needs.
"""

from __future__ import annotations

import math

#: Relative width of a bucket.
RESOLUTION = 0.02
#: Values at or below this (ms) share the first bucket.
FLOOR_MS = 0.01

_LOG = math.log1p(RESOLUTION)


class Histogram:
    """Counts of values by logarithmic bucket, with exact count, sum and max."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        """Record one value (milliseconds, or any positive unit)."""
        index = 0 if value <= FLOOR_MS else int(math.log(value / FLOOR_MS) / _LOG) + 1
        self.counts[index] = self.counts.get(index, 0) + 1
        self.count += 1
        self.total += value
        self.max = max(self.max, value)

    def percentile(self, q: float) -> float:
        """Return the value below which a fraction `q` of the samples fall."""
        if self.count == 0:
            return 0.0
        rank = max(1, math.ceil(q * self.count))
        seen = 0
        for index in sorted(self.counts):
            seen += self.counts[index]
            if seen >= rank:
                upper = FLOOR_MS * math.exp(index * _LOG)
                return min(upper, self.max)
        return self.max

    def summary(self) -> dict[str, float]:
        """Count, mean, p50, p95, p99 and max, for reports."""
        mean = self.total / self.count if self.count else 0.0
        return {
            "count": self.count,
            "mean": round(mean, 3),
            "p50": round(self.percentile(0.50), 3),
            "p95": round(self.percentile(0.95), 3),
            "p99": round(self.percentile(0.99), 3),
            "max": round(self.max, 3),
        }
