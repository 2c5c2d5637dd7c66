"""Distributed runs: the connection budget holds for the whole test, not per worker.

Locust's `--processes N` starts a master and N workers; each worker sizes its pools
from its share of the profile's budget, and `target_ops` is split between them.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.conftest import ROOT, cdc_load_connections
from tests.pipeline import free_port
from tests.test_locust_run import dbname, run_locust

#: A pool far smaller than the demand, so the budget is what limits connections.
POOL_MAX = 8


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_budget_holds_for_the_whole_test(
    workers: int,
    tmp_path: Path,
    conn: psycopg.Connection[Any],
    db_url: str,
    redis_url: str,
) -> None:
    done, report = run_locust(
        tmp_path,
        db_url,
        redis_url,
        {
            "DB_MAX_CONNECTIONS": str(POOL_MAX),
            "DB_MIN_CONNECTIONS": "4",
            "CDC_WORKLOAD__TARGET_OPS": "1203",
            "CDC_UTILIZATION_PAUSE__ENABLED": "false",
        },
        "-u",
        "32",
        *(["--processes", str(workers)] if workers > 1 else []),
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert report is not None
    # Exact in total, whatever the split (1203 does not divide by 2 or 4).
    assert report["operations"] == 1203
    # Demand (32 users) far above the pool: the peak is the budget, not N times it.
    assert report["peak_pool_connections"] <= POOL_MAX
    assert report["peak_pool_connections"] >= POOL_MAX // 2
    if workers > 1:
        assert len(report["processes"]) == workers
        assert f"split 1203 operations over {workers} workers" in log
    assert cdc_load_connections(db_url, dbname(db_url)) == []


def test_preflight_refuses_a_profile_that_does_not_fit(
    tmp_path: Path, db_url: str, redis_url: str
) -> None:
    done, report = run_locust(
        tmp_path, db_url, redis_url, {}, profile="configs/baseline.yaml"
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("cdc-load:")]
    assert len(lines) == 1
    assert "profile baseline does not fit: 500 users (1 x 500)" in lines[0]
    assert "= 604 connections; the server allows" in lines[0]
    assert "--allow-overcommit" in lines[0]
    assert report is None


@pytest.mark.slow
def test_overcommit_runs_anyway_and_reports_connections(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    done, report = run_locust(
        tmp_path,
        db_url,
        redis_url,
        {"CDC_WORKLOAD__TARGET_OPS": "300", "CDC_WORKLOAD__ACCOUNT_COUNT": "100"},
        "--cdc-allow-overcommit",
        "-u",
        "5",
        profile="configs/baseline.yaml",
    )
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "overcommit allowed" in log
    assert report is not None and report["operations"] == 300
    # The baseline's pool keeps 100 connections open whatever the load needs.
    assert report["peak_pool_connections"] >= 100


@pytest.mark.slow
def test_overcommit_survives_too_many_clients_and_counts_them(
    tmp_path: Path, redis_url: str
) -> None:
    # A server of its own with room for 20 connections: the baseline's pool of 100
    # runs into "too many clients" for real.
    port = free_port()
    env = {
        **os.environ,
        "CDC_PG_PORT": str(port),
        "CDC_PG_MAX_CONNECTIONS": "20",
        "CDC_STATE_DIR": f"/tmp/cdc-load-test-{os.getpid()}",
    }
    env.pop("DATABASE_URL", None)
    subprocess.run([str(ROOT / "scripts/services.sh"), "up"], env=env, check=True)
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        done, report = run_locust(
            tmp_path,
            url,
            redis_url,
            {
                "CDC_WORKLOAD__TARGET_OPS": "300",
                "CDC_WORKLOAD__ACCOUNT_COUNT": "50",
                "CDC_THRESHOLDS__MAX_FAILURE_RATIO": "1",
            },
            "--cdc-allow-overcommit",
            "-u",
            "5",
            profile="configs/baseline.yaml",
        )
        log = done.stdout + done.stderr
        assert done.returncode == 0, log[-3000:]
        assert report is not None and report["operations"] == 300
        assert report["connection_errors"] > 0
        assert "too many clients" in log or "remaining connection slots" in log
        assert report["peak_pool_connections"] < 20
    finally:
        subprocess.run([str(ROOT / "scripts/services.sh"), "down"], env=env, check=True)
