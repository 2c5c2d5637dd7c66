"""`make compare`: the baseline and the optimized profile, one after the other.

Runs `scripts/load.sh` for each profile on the same server (the baseline with
overcommit allowed, since it cannot fit), then writes a side-by-side table as
Markdown (reports/compare.md) and a plot of throughput and CDC lag over time for
both (reports/compare.png), and prints the table.

    python -m scripts.compare [--skip-runs]   (--skip-runs: use the last reports)
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services import logs

logger = logs.get("compare")

REPORTS = Path("reports")
PROFILES: tuple[tuple[str, str, list[str]], ...] = (
    ("baseline", "configs/baseline.yaml", ["--cdc-allow-overcommit"]),
    ("optimized", "configs/optimized.yaml", []),
)
#: How long one profile's whole run may take, in seconds.
RUN_TIMEOUT_S = 1800
OPERATION_TYPES = ("PG", "REDIS")
_RSS = re.compile(r"consumer stopped: .* peak rss (\d+) KiB")


@dataclass
class Run:
    """What one profile's run left in reports/."""

    name: str
    exit_code: int | None
    summary: dict[str, Any]
    consumer_rss_kib: int | None
    #: Seconds since the first sample: operations/s, and CDC lag p99 ms.
    throughput: list[tuple[float, float]] = field(default_factory=list)
    lag_p99: list[tuple[float, float]] = field(default_factory=list)


def run_profile(name: str, path: str, extra: list[str]) -> int:
    """Run one profile end to end; return the exit code of scripts/load.sh."""
    logger.info("running the %s profile (%s)", name, path)
    started = time.monotonic()
    done = subprocess.run(
        ["scripts/load.sh", path, *extra], timeout=RUN_TIMEOUT_S, check=False
    )
    logger.info(
        "%s finished in %.0f s with exit code %s",
        name,
        time.monotonic() - started,
        done.returncode,
    )
    return done.returncode


def collect(name: str, exit_code: int | None) -> Run:
    """Read the reports one run wrote."""
    summary_path = REPORTS / f"{name}-summary.json"
    if not summary_path.exists():
        raise SystemExit(
            f"compare: {summary_path} is missing; did the {name} run fail?"
        )
    summary = json.loads(summary_path.read_text())
    log = REPORTS / f"{name}-consumer.log"
    match = _RSS.search(log.read_text()) if log.exists() else None
    run = Run(name, exit_code, summary, int(match.group(1)) if match else None)
    history = REPORTS / f"{name}_stats_history.csv"
    if history.exists():
        run.throughput, run.lag_p99 = _series(history)
    return run


def _series(path: Path) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    # Locust's Requests/s column is a rolling average that trails the load; the
    # change of the running total between samples is the throughput itself.
    totals: dict[float, float] = {}
    lag: dict[float, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            t = float(row["Timestamp"])
            if row["Type"] in OPERATION_TYPES:
                totals[t] = totals.get(t, 0.0) + float(row["Total Request Count"] or 0)
            elif row["Type"] == "CDC" and row["99%"] not in ("", "N/A"):
                lag[t] = float(row["99%"])
    start = min([*totals, *lag], default=0.0)
    times = sorted(totals)
    rates = [
        (t - start, (totals[t] - totals[p]) / (t - p))
        for p, t in itertools.pairwise(times)
        if t > p
    ]
    return rates, [(t - start, v) for t, v in sorted(lag.items())]


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f} MiB"


def table(runs: list[Run]) -> list[str]:
    """The side-by-side comparison as Markdown lines."""

    def row(label: str, *cells: object) -> str:
        return f"| {label} | " + " | ".join(str(c) for c in cells) + " |"

    lines = [row("", *(r.name for r in runs)), "|---|" + "---|" * len(runs)]
    s = [r.summary for r in runs]
    lines.append(row("operations/s", *(f"{x['ops_per_s']:.0f}" for x in s)))
    lines.append(row("operations", *(f"{x['operations']}" for x in s)))
    lines.append(row("p50 ms", *(f"{x['latency_ms']['p50']:.0f}" for x in s)))
    lines.append(row("p99 ms", *(f"{x['latency_ms']['p99']:.0f}" for x in s)))
    kinds = sorted({k for x in s for k in x["failures_by_kind"]})
    lines.append(row("failures", *(f"{x['failures']}" for x in s)))
    for kind in kinds:
        lines.append(row(f"  {kind}", *(x["failures_by_kind"].get(kind, 0) for x in s)))
    lines.append(row("peak connections", *(x["peak_connections"] for x in s)))
    lines.append(row("connections refused", *(x["connection_errors"] for x in s)))
    lines.append(
        row("peak RSS, Locust", *(_mib(x["peak_rss_kib"]["locust"]) for x in s))
    )
    lines.append(row("peak RSS, consumer", *(_mib(r.consumer_rss_kib) for r in runs)))
    lines.append(row("CDC lag p99 ms", *(_lag(x) for x in s)))
    lines.append(row("breaker trips", *(x["breaker_trips"] for x in s)))
    lines.append(row("verification", *(_verdict(x) for x in s)))
    lines.append(row("exit code", *(r.exit_code for r in runs)))
    return lines


def _lag(summary: dict[str, Any]) -> str:
    lag = (summary.get("verification") or {}).get("lag") or {}
    value = lag.get("p99_ms")
    return "-" if value is None else f"{value:.0f}"


def _verdict(summary: dict[str, Any]) -> str:
    verification = summary.get("verification")
    if not verification:
        return "not run"
    bad = sum(c["violations"] for c in verification["checks"])
    return "pass" if bad == 0 else f"{bad} violations"


def plot(runs: list[Run], path: Path) -> None:
    """Throughput and CDC lag p99 over time, both profiles, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for run in runs:
        if run.throughput:
            top.plot(*zip(*run.throughput, strict=True), label=run.name)
        if run.lag_p99:
            bottom.plot(*zip(*run.lag_p99, strict=True), label=run.name)
    top.set_ylabel("operations/s")
    top.set_title("throughput")
    bottom.set_ylabel("ms")
    bottom.set_title("CDC lag, p99 (Locust's rolling window)")
    bottom.set_xlabel("seconds since the run started")
    for axis in (top, bottom):
        axis.grid(True, alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run both profiles, then write and print the comparison."""
    parser = argparse.ArgumentParser(prog="compare", description=__doc__)
    parser.add_argument("--skip-runs", action="store_true", help="reuse the reports")
    args = parser.parse_args(argv)
    logs.configure()
    REPORTS.mkdir(exist_ok=True)

    runs = []
    for name, path, extra in PROFILES:
        code = None if args.skip_runs else run_profile(name, path, extra)
        runs.append(collect(name, code))

    stamp = time.strftime("%Y-%m-%d %H:%M %Z")
    lines = [f"# baseline vs optimized, {stamp}", "", *table(runs), ""]
    (REPORTS / "compare.md").write_text("\n".join(lines))
    plot(runs, REPORTS / "compare.png")
    print("\n".join(lines))
    print("written: reports/compare.md, reports/compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
