"""The end-of-run summary: throughput, latency, failures by kind, gates, verdict."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from locust.env import Environment
from locust.stats import StatsEntry, StatsError

from cdc_users.harness import Counters, Harness
from services import thresholds
from services.config import Profile
from services.procstats import peak_rss_kib

#: Request types of account operations (PostgreSQL and the cache) and of CDC.
OPERATION_TYPES = ("PG", "REDIS")
CDC_TYPE = "CDC"
#: Failure kinds that are a deadline passing, reported apart from errors.
TIMEOUT_KINDS = frozenset({"OperationTimeout"})

#: Counters sent by workers, by worker id; filled on the master.
WORKER_COUNTERS: dict[str, dict[str, Any]] = {}


def merged(environment: Environment, *request_types: str) -> StatsEntry:
    """Merge every stats row of the given request types into one entry."""
    stats = environment.stats
    total = StatsEntry(
        stats, "+".join(request_types), "", use_response_times_cache=False
    )
    for (_name, method), entry in stats.entries.items():
        if method in request_types:
            total.extend(entry)
    return total


def failure_kinds(environment: Environment, *request_types: str) -> Counter[str]:
    """Count failures of the given request types by exception name."""
    kinds: Counter[str] = Counter()
    for err in environment.stats.errors.values():
        if err.method in request_types:
            # An exception locally, its repr() once it came from a worker.
            text = StatsError.parse_error(err.error)
            kinds[text.split("(", 1)[0].strip()] += err.occurrences
    return kinds


def process_counters(harness: Harness | None) -> dict[str, dict[str, Any]]:
    """Counters of every process that ran users: this one, or the workers'."""
    if harness is not None:
        return {"local": dataclasses.asdict(harness.snapshot())}
    return dict(WORKER_COUNTERS)


def build(
    environment: Environment,
    profile: Profile,
    harness: Harness | None,
    *,
    end: dict[str, Any] | None = None,
    verified: bool = True,
    peak_connections: tuple[int, int] = (0, 0),
) -> dict[str, Any]:
    """Gather the run's numbers into a JSON-ready dict with a verdict.

    `end` is the drain and verification result; with `verified` and no `end`, the
    verification did not run, which fails the run.
    """
    ops = merged(environment, *OPERATION_TYPES)
    kinds = failure_kinds(environment, *OPERATION_TYPES)
    cdc = merged(environment, CDC_TYPE)
    duration = max(1e-9, (ops.last_request_timestamp or 0) - ops.start_time)
    ratio = ops.num_failures / ops.num_requests if ops.num_requests else 0.0
    p99 = ops.get_response_time_percentile(0.99) if ops.num_requests else 0.0
    per_process = process_counters(harness)
    totals = Counters()
    for counters in per_process.values():
        totals.trips += counters["trips"]
        totals.breaker_paused_s += counters["breaker_paused_s"]
        totals.utilization_pauses += counters["utilization_pauses"]
        totals.utilization_paused_s += counters["utilization_paused_s"]
        totals.peak_utilization = max(
            totals.peak_utilization, counters["peak_utilization"]
        )
        totals.conflicts_retried += counters["conflicts_retried"]
        totals.cache_hits += counters["cache_hits"]
        totals.cache_misses += counters["cache_misses"]
        totals.cache_errors += counters["cache_errors"]
        totals.projection_misses += counters["projection_misses"]
        totals.connection_errors += counters["connection_errors"]
        totals.batches += counters["batches"]
        totals.batched_commands += counters["batched_commands"]
        totals.largest_batch = max(totals.largest_batch, counters["largest_batch"])
        totals.expired_in_queue += counters["expired_in_queue"]

    verification = (end or {}).get("verification")
    lag_p99: float | None = None
    violations: int | None = None
    if verified:
        violations = (
            sum(c["violations"] for c in verification["checks"])
            if verification
            else 1  # nothing was verified: that is not a pass
        )
        lag = (verification or {}).get("lag") or {}
        lag_p99 = float(lag.get("p99_ms") or 0.0)
        if end is not None and "error" in end.get("drain", {}):
            violations = max(violations, 1)
    verdicts = thresholds.evaluate(
        profile.thresholds,
        failure_ratio=ratio,
        p99_ms=p99,
        cdc_lag_p99_ms=lag_p99,
        violations=violations,
    )
    return {
        "profile": profile.name,
        "write_path": profile.event_store.write_path,
        "operations": ops.num_requests,
        "target_ops": profile.workload.target_ops,
        "duration_s": round(duration, 3),
        "ops_per_s": round(ops.num_requests / duration, 1) if ops.num_requests else 0.0,
        "latency_ms": _percentiles(ops),
        "failures": ops.num_failures,
        "failure_ratio": ratio,
        "timeouts": sum(n for k, n in kinds.items() if k in TIMEOUT_KINDS),
        "errors": sum(n for k, n in kinds.items() if k not in TIMEOUT_KINDS),
        "failures_by_kind": dict(sorted(kinds.items())),
        "breaker_trips": totals.trips,
        "breaker_paused_s": totals.breaker_paused_s,
        "utilization_pauses": totals.utilization_pauses,
        "utilization_paused_s": totals.utilization_paused_s,
        "peak_pool_utilization": round(totals.peak_utilization, 3),
        "peak_rss_kib": {
            "locust": peak_rss_kib(),
            **{f"worker {n}": c["peak_rss_kib"] for n, c in per_process.items()},
        },
        "peak_connections": peak_connections[0],
        "peak_pool_connections": peak_connections[1],
        "connection_errors": totals.connection_errors,
        "conflicts_retried": totals.conflicts_retried,
        "group_commit": {
            "batches": totals.batches,
            "commands": totals.batched_commands,
            "largest_batch": totals.largest_batch,
            "expired_in_queue": totals.expired_in_queue,
        }
        if profile.event_store.write_path == "batched"
        else None,
        "cache": {
            "hits": totals.cache_hits,
            "misses": totals.cache_misses,
            "errors": totals.cache_errors,
            "projection_misses": totals.projection_misses,
        },
        "cdc_live": {
            "samples": cdc.num_requests,
            "late": cdc.num_failures,
            "latency_ms": _percentiles(cdc),
        },
        "drain": (end or {}).get("drain"),
        "verification": verification,
        "verified": verified,
        "processes": per_process,
        "thresholds": [dataclasses.asdict(v) for v in verdicts],
        "passed": all(v.passed for v in verdicts),
    }


def _percentiles(entry: StatsEntry) -> dict[str, float]:
    if not entry.num_requests:
        return {"p50": 0, "p95": 0, "p99": 0, "max": 0}
    return {
        q: entry.get_response_time_percentile(p)
        for q, p in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99), ("max", 1.0))
    }


def render(report: dict[str, Any]) -> list[str]:
    """Format the summary as text lines for the terminal."""
    lat = report["latency_ms"]
    lines = [
        "",
        f"cdc-load summary: profile {report['profile']}, {report['write_path']} path",
        f"  operations      {report['operations']} of {report['target_ops']}"
        f" in {report['duration_s']:.2f} s ({report['ops_per_s']:.0f}/s)",
        f"  latency ms      p50 {lat['p50']:.0f}  p95 {lat['p95']:.0f}"
        f"  p99 {lat['p99']:.0f}  max {lat['max']:.0f}",
        f"  failures        {report['failures']} ({report['failure_ratio']:.2%}):"
        f" {report['timeouts']} timeouts, {report['errors']} errors",
    ]
    for kind, count in report["failures_by_kind"].items():
        lines.append(f"    {kind:<18} {count}")
    cache = report["cache"]
    live = report["cdc_live"]
    lines += [
        f"  cache reads     {cache['hits']} hits, {cache['misses']} misses,"
        f" {cache['errors']} errors, {cache['projection_misses']} not projected yet",
        f"  cdc live        {live['samples']} transactions seen,"
        f" p50 {live['latency_ms']['p50']:.0f} ms"
        f" p99 {live['latency_ms']['p99']:.0f} ms, {live['late']} late",
    ]
    verification = report["verification"]
    if verification:
        lag = verification["lag"]
        lines.append(
            f"  cdc lag ms      p50 {_ms(lag['p50_ms'])}  p95 {_ms(lag['p95_ms'])}"
            f"  p99 {_ms(lag['p99_ms'])}  max {_ms(lag['max_ms'])}"
            f" over {lag['count']} source transactions"
        )
    drain = report["drain"] or {}
    if "error" in drain:
        lines.append(f"  drain           FAILED: {drain['error']}")
    elif drain:
        lines.append(f"  drain           caught up in {drain['seconds']:.2f} s")
    if verification:
        for check in verification["checks"]:
            mark = (
                "ok"
                if check["violations"] == 0
                else f"{check['violations']} violations"
            )
            lines.append(f"    {check['name']:<28} {mark}")
    elif not report["verified"]:
        lines.append("  verification    skipped (--cdc-skip-verify)")
    lines += [
        f"  breaker         {report['breaker_trips']} trips,"
        f" {report['breaker_paused_s']:g} s paused",
        f"  pool            peak utilization {report['peak_pool_utilization']:.2f},"
        f" {report['utilization_pauses']} pauses, {report['utilization_paused_s']:g} s",
        f"  connections     peak {report['peak_connections']} of ours"
        f" ({report['peak_pool_connections']} in the users' pools),"
        f" {report['connection_errors']} failed to open",
        f"  conflicts       {report['conflicts_retried']} retried",
    ]
    group = report.get("group_commit")
    if group:
        mean = group["commands"] / group["batches"] if group["batches"] else 0.0
        lines.append(
            f"  group commit    {group['batches']} batches of {mean:.1f} commands"
            f" on average, largest {group['largest_batch']},"
            f" {group['expired_in_queue']} expired in the queue"
        )
    if len(report["processes"]) > 1:
        for name, c in sorted(report["processes"].items()):
            lines.append(
                f"    worker {name[-12:]:<12} {c['trips']} trips,"
                f" {c['breaker_paused_s'] + c['utilization_paused_s']:g} s paused,"
                f" peak utilization {c['peak_utilization']:.2f}"
            )
    lines.append("")
    lines += [
        "  " + line
        for line in thresholds.table(
            [thresholds.Verdict(**v) for v in report["thresholds"]]
        )
    ]
    lines.append(f"  verdict         {'PASS' if report['passed'] else 'FAIL'}")
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
