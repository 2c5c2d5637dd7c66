"""Headless Locust runs of a few seconds: budget, gates, exit codes, clean stop.

These runs exercise the workload alone (`--cdc-skip-verify`); the runs with a CDC
consumer, drain and verification are in test_cdc_end_to_end.py.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ROOT, cdc_load_connections, unique

LOCUST = str(Path(sys.executable).with_name("locust"))


def run_locust(
    tmp_path: Path,
    db_url: str,
    redis_url: str,
    env: dict[str, str] | None = None,
    *args: str,
    profile: str = "configs/optimized.yaml",
    skip_verify: bool = True,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    summary = tmp_path / "summary.json"
    full_env = {
        **{
            k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "LOCUST_"))
        },
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        # Speed is for `make bench`; a busy machine must not fail these.
        "CDC_THRESHOLDS__MAX_P99_MS": "30000",
        # Slot names are global to the server: another database's must not clash.
        "CDC_CDC__SLOT_NAME": unique("cdc_load_r"),
        "CDC_CDC__PUBLICATION_NAME": unique("cdc_load_r"),
        **(env or {}),
    }
    done = subprocess.run(
        [
            LOCUST,
            "-f",
            "locustfile.py",
            "--headless",
            "--only-summary",
            "--cdc-profile",
            profile,
            "--csv",
            str(tmp_path / "run"),
            "--cdc-summary",
            str(summary),
            "-t",
            "60s",
            *(["--cdc-skip-verify"] if skip_verify else []),
            *args,
        ],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = json.loads(summary.read_text()) if summary.exists() else None
    return done, report


def csv_total(tmp_path: Path) -> dict[str, str]:
    with open(tmp_path / "run_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    return rows["Aggregated"]


def dbname(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])


@pytest.mark.slow
def test_run_stops_after_exactly_target_ops_and_leaves_nothing(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    done, report = run_locust(
        tmp_path, db_url, redis_url, {"CDC_WORKLOAD__TARGET_OPS": "777"}, "-u", "8"
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert report is not None and report["operations"] == 777
    assert csv_total(tmp_path)["Request Count"] == "777"
    assert report["passed"] is True
    assert "another command is already in progress" not in log
    assert "Traceback" not in log
    assert "closed pool cdc-load-users-" in log
    assert cdc_load_connections(db_url, dbname(db_url)) == []

    # What the users did is in the event store: every success wrote its events.
    succeeded = {
        name: int(row["Request Count"]) - int(row["Failure Count"])
        for name, row in _rows(tmp_path).items()
    }
    counts = dict(
        conn.execute(
            "SELECT event_type, count(*) FROM events GROUP BY event_type"
        ).fetchall()
    )
    assert counts.get("MoneyDeposited", 0) == succeeded.get("deposit", 0)
    assert counts.get("MoneyWithdrawn", 0) == succeeded.get("withdraw", 0)
    assert counts.get("TransferDebited", 0) == succeeded.get("transfer", 0)
    assert counts.get("TransferCredited", 0) == succeeded.get("transfer", 0)


def _rows(tmp_path: Path) -> dict[str, dict[str, str]]:
    with open(tmp_path / "run_stats.csv") as f:
        return {r["Name"]: r for r in csv.DictReader(f) if r["Name"] != "Aggregated"}


@pytest.mark.slow
def test_batched_path_run(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    # Two permits for twenty users: queued writes hold none, so batches grow past
    # two; reads still take one.
    done, report = run_locust(
        tmp_path,
        db_url,
        redis_url,
        {
            "CDC_EVENT_STORE__WRITE_PATH": "batched",
            "CDC_WORKLOAD__TARGET_OPS": "2000",
            "CDC_EVENT_STORE__BATCH_PROCESSOR_COUNT": "1",
            "CDC_IN_FLIGHT__PERMITS": "2",
        },
        "-u",
        "20",
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert report is not None and report["operations"] == 2000
    assert report["write_path"] == "batched"
    assert "closed pool cdc-load-writers-" in done.stderr
    assert cdc_load_connections(db_url, dbname(db_url)) == []
    group = report["group_commit"]
    assert group["commands"] == 2000 - _balance_reads(tmp_path)
    assert group["largest_batch"] > 2
    assert group["batches"] < group["commands"]
    assert "group commit    " in done.stdout


def _balance_reads(tmp_path: Path) -> int:
    # One row per store that answered (PG, REDIS): all of them count.
    with open(tmp_path / "run_stats.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["Name"] == "balance"]
    return sum(int(r["Request Count"]) for r in rows)


@pytest.mark.slow
def test_broken_threshold_exits_1(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    done, report = run_locust(
        tmp_path,
        db_url,
        redis_url,
        {"CDC_WORKLOAD__TARGET_OPS": "200", "CDC_THRESHOLDS__MAX_P99_MS": "0.001"},
    )
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    assert report is not None and report["passed"] is False
    assert "FAIL" in done.stdout


@pytest.mark.slow
def test_breaker_and_utilization_pause_trip_and_release(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    # One connection for 20 users and an acquire timeout of 1 ms: pool timeouts in
    # a row open the breaker, and a full pool pauses new operations.
    done, report = run_locust(
        tmp_path,
        db_url,
        redis_url,
        {
            "DB_MAX_CONNECTIONS": "1",
            "DB_MIN_CONNECTIONS": "1",
            "CDC_DATABASE__POOL__ACQUIRE_TIMEOUT": "1ms",
            "CDC_CIRCUIT_BREAKER__FAILURE_THRESHOLD": "5",
            "CDC_CIRCUIT_BREAKER__PAUSE": "300ms",
            "CDC_UTILIZATION_PAUSE__PAUSE": "100ms",
            "CDC_WORKLOAD__TARGET_OPS": "600",
            "CDC_THRESHOLDS__MAX_FAILURE_RATIO": "1",
        },
        "-u",
        "20",
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert report is not None
    assert report["operations"] == 600
    assert report["breaker_trips"] >= 1
    assert report["failures_by_kind"].get("PoolTimeout", 0) >= 5
    assert report["failures_by_kind"].get("BreakerOpen", 0) >= 1
    assert report["utilization_pauses"] >= 1
    assert report["peak_pool_utilization"] == 1.0
    # Released: operations went on succeeding after the trips.
    assert report["operations"] - report["failures"] > 0
    assert "circuit breaker open" in log
    assert cdc_load_connections(db_url, dbname(db_url)) == []


def test_bad_profile_exits_2_with_one_line_and_writes_nothing(
    tmp_path: Path, db_url: str, redis_url: str
) -> None:
    done, report = run_locust(tmp_path, db_url, redis_url, {"DB_MAX_CONNECTIONS": "-3"})
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("cdc-load:")]
    assert errors == [
        "cdc-load: database.pool.max_size (from DB_MAX_CONNECTIONS): -3 is not allowed;"
        " expected a number greater than 0"
    ]
    assert "Traceback" not in done.stderr
    assert report is None
    assert not list(tmp_path.glob("run*.csv"))
