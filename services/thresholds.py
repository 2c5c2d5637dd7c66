"""The pass/fail table that decides a headless run's exit code."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import Thresholds


@dataclass(frozen=True)
class Verdict:
    """One threshold: its limit, what was measured, and whether it held.

    `actual` is None when the run did not measure it (verification skipped); such a
    threshold neither passes nor fails the run.
    """

    name: str
    limit: float
    actual: float | None
    passed: bool


def evaluate(
    limits: Thresholds,
    *,
    failure_ratio: float,
    p99_ms: float,
    cdc_lag_p99_ms: float | None = None,
    violations: int | None = None,
) -> list[Verdict]:
    """Compare the run's numbers with the profile's limits."""
    rows = [
        ("failure ratio", limits.max_failure_ratio, failure_ratio),
        ("p99 operation ms", limits.max_p99_ms, p99_ms),
        ("p99 cdc lag ms", limits.max_cdc_lag_p99_ms, cdc_lag_p99_ms),
        ("verification violations", limits.max_verification_violations, violations),
    ]
    return [
        Verdict(name, float(limit), actual, actual is None or actual <= limit)
        for name, limit, actual in rows
    ]


def table(verdicts: list[Verdict]) -> list[str]:
    """Format verdicts as aligned text lines."""
    lines = [f"{'threshold':<24} {'limit':>10} {'actual':>10}  result"]
    for v in verdicts:
        if v.actual is None:
            lines.append(f"{v.name:<24} {v.limit:>10.4g} {'-':>10}  skipped")
            continue
        result = "pass" if v.passed else "FAIL"
        lines.append(f"{v.name:<24} {v.limit:>10.4g} {v.actual:>10.4g}  {result}")
    return lines
