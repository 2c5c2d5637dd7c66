"""The bench's pgbench script on a real server, and the bench's result parsing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from scripts.bench import (
    SCRIPT,
    BenchError,
    SoakSample,
    analyse_soak,
    harness_result,
    parse_bare,
    parse_pgbench,
    slope,
)
from services.config import CONFLICT_ATTEMPTS, MAX_AMOUNT, OPENING_BALANCE
from services.eventstore import create_accounts
from tests.conftest import ROOT

ACCOUNTS = 50
TRANSACTIONS = 20

PGBENCH_OUTPUT = """\
pgbench (15.20 (Debian 15.20-0+deb12u1))
transaction type: scripts/bench_transfer.sql
query mode: prepared
number of clients: 10
number of threads: 1
maximum number of tries: 5
duration: 5 s
number of transactions actually processed: 7884
number of failed transactions: 0 (0.000%)
number of transactions retried: 232 (2.943%)
total number of retries: 239
latency average = 6.289 ms
initial connection time = 63.460 ms
tps = 1590.009801 (without initial connection time)
"""


@pytest.mark.skipif(shutil.which("pgbench") is None, reason="pgbench not installed")
def test_pgbench_script_runs_transfers_like_the_direct_path(
    conn: psycopg.Connection[Any], db_url: str
) -> None:
    create_accounts(conn, ACCOUNTS, OPENING_BALANCE, batch_size=ACCOUNTS)

    done = subprocess.run(
        [
            "pgbench",
            "--no-vacuum",
            "--protocol=prepared",
            "--client=1",
            f"--transactions={TRANSACTIONS}",
            f"--max-tries={CONFLICT_ATTEMPTS}",
            f"--define=accounts={ACCOUNTS}",
            f"--define=max_amount={MAX_AMOUNT}",
            f"--file={SCRIPT}",
            db_url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    run = parse_pgbench(done.stdout, clients=1)
    assert run.transactions == TRANSACTIONS
    assert run.failed == 0
    # Every balance covers any amount: each transaction is one transfer appended.
    assert_transfers(conn, TRANSACTIONS)


def assert_transfers(conn: psycopg.Connection[Any], appended: int) -> None:
    """`appended` transfers are in the events, money is conserved, heads agree."""
    counts = dict(
        conn.execute(
            "SELECT event_type, count(*) FROM events GROUP BY event_type"
        ).fetchall()
    )
    assert counts["TransferDebited"] == counts["TransferCredited"] == appended
    total = conn.execute("SELECT sum(balance) FROM accounts").fetchone()
    assert total is not None and total[0] == ACCOUNTS * OPENING_BALANCE
    heads_behind = conn.execute(
        "SELECT count(*) FROM accounts a WHERE a.version <>"
        " (SELECT max(version) FROM events e WHERE e.account_id = a.account_id)"
    ).fetchone()
    assert heads_behind == (0,)


@pytest.mark.parametrize(
    ("mode", "extra"),
    [("direct", ["--clients", "3"]), ("batched", ["--writers", "2", "--batch", "7"])],
)
def test_bare_client_moves_money_like_the_harness(
    conn: psycopg.Connection[Any], db_url: str, mode: str, extra: list[str]
) -> None:
    create_accounts(conn, ACCOUNTS, OPENING_BALANCE, batch_size=ACCOUNTS)

    done = subprocess.run(
        [
            *(sys.executable, "-m", "scripts.bare", mode, *extra),
            *("--seconds", "1", "--url", db_url, "--accounts", str(ACCOUNTS)),
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr[-2000:]
    run = parse_bare(done.stdout)
    assert run.mode == mode
    assert run.operations > 0
    assert (run.batch_p99_ms is None) == (mode == "direct")
    result = json.loads(done.stdout)
    assert_transfers(conn, run.operations - result["rejected"] - result["conflicts"])


def test_parse_bare_refuses_output_without_a_result() -> None:
    with pytest.raises(BenchError, match="no result"):
        parse_bare("scripts.bare: cannot connect\n")
    with pytest.raises(BenchError, match="bad result"):
        parse_bare('{"mode": "direct"}\n')


def test_parse_pgbench_reads_throughput_failures_and_retries() -> None:
    run = parse_pgbench(PGBENCH_OUTPUT, clients=10)

    assert run.tps == pytest.approx(1590.009801)
    assert run.transactions == 7884
    assert run.failed == 0
    assert run.retried == 232
    assert run.latency_ms == pytest.approx(6.289)


def test_parse_pgbench_refuses_output_without_throughput() -> None:
    with pytest.raises(BenchError, match="no throughput"):
        parse_pgbench("pgbench: error: connection refused\n", clients=1)


def _summary(**extra: Any) -> dict[str, Any]:
    return {
        "operations": 3000,
        "duration_s": 15.0,
        "ops_per_s": 200.0,
        "latency_ms": {"p50": 12, "p95": 30, "p99": 45, "max": 90},
        "failures": 2,
        "conflicts_retried": 40,
        "passed": True,
        **extra,
    }


def test_harness_result_reads_the_summary_json() -> None:
    lag = {"count": 2900, "p50_ms": 8.5, "p95_ms": 20.0, "p99_ms": 31.25}
    summary = _summary(verification={"passed": True, "lag": lag})

    run = harness_result(summary, users=10, cpu_s=4.5, exit_code=0)

    assert (run.operations, run.ops_per_s, run.duration_s) == (3000, 200.0, 15.0)
    assert (run.p50_ms, run.p99_ms, run.failures) == (12.0, 45.0, 2)
    assert (run.lag_count, run.lag_p50_ms, run.lag_p99_ms) == (2900, 8.5, 31.25)
    assert run.verification_passed is True
    assert run.cpu_s == 4.5


def test_harness_result_of_an_unverified_run_has_no_lag() -> None:
    run = harness_result(_summary(verification=None), users=5, cpu_s=1, exit_code=0)

    assert run.lag_p99_ms is None and run.verification_passed is None


def test_harness_result_refuses_a_summary_without_operations() -> None:
    summary = _summary()
    del summary["operations"]

    with pytest.raises(BenchError, match="operations"):
        harness_result(summary, users=5, cpu_s=1, exit_code=0)


def test_slope_of_a_line_and_of_too_few_points() -> None:
    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert slope([(5, 9)]) == 0.0


def _soak(backlog_step: int, rss_step: int) -> list[SoakSample]:
    return [
        SoakSample(
            t_s=t * 10.0,
            locust_rss_kb=100_000 + t * rss_step,
            consumer_rss_kb=50_000,
            backlog_bytes=10_000 + t * backlog_step,
            applied=t * 9_900,
            produced=t * 10_000,
        )
        for t in range(13)
    ]


def test_analyse_soak_finds_a_steady_consumer() -> None:
    result = analyse_soak(_soak(0, 0), run_s=120)

    assert result["produced_per_s"] == pytest.approx(1000.0)
    assert result["keep_up"] == pytest.approx(0.99)
    assert result["reference_s"] == 30.0  # a quarter of a soak shorter than 4 min
    assert result["backlog_grew"] is False
    assert result["locust_rss_growth"] == 0.0


def test_analyse_soak_finds_a_growing_backlog_and_rss() -> None:
    result = analyse_soak(_soak(400_000, 2_000), run_s=120)

    assert result["backlog_grew"] is True
    assert result["backlog_trend_bytes_per_min"] == pytest.approx(2_400_000)
    # From 106 000 kB at 30 s to 124 000 kB at 120 s.
    assert result["locust_rss_growth"] == pytest.approx(18 / 106, abs=1e-4)


def test_analyse_soak_needs_two_samples_under_load() -> None:
    with pytest.raises(BenchError, match="samples"):
        analyse_soak(_soak(0, 0)[:1], run_s=120)
