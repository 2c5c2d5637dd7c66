"""The pass/fail table that decides a headless run's exit code."""

from __future__ import annotations

from dataclasses import dataclass

from services.config import Thresholds


@dataclass(frozen=True)
class Verdict:
    """One threshold: its name, its limit, what was measured, and whether it held."""

    name: str
    limit: float
    actual: float
    passed: bool


def evaluate(
    limits: Thresholds, *, failure_ratio: float, p99_ms: float
) -> list[Verdict]:
    """Compare the run's numbers with the profile's limits."""
    return [
        Verdict(
            "failure ratio",
            limits.max_failure_ratio,
            failure_ratio,
            failure_ratio <= limits.max_failure_ratio,
        ),
        Verdict(
            "p99 operation ms", limits.max_p99_ms, p99_ms, p99_ms <= limits.max_p99_ms
        ),
    ]


def table(verdicts: list[Verdict]) -> list[str]:
    """Format verdicts as aligned text lines."""
    lines = [f"{'threshold':<22} {'limit':>10} {'actual':>10}  result"]
    for v in verdicts:
        lines.append(
            f"{v.name:<22} {v.limit:>10.4g} {v.actual:>10.4g}  "
            + ("pass" if v.passed else "FAIL")
        )
    return lines
