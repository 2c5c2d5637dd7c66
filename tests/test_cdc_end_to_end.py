"""The CDC pipeline end to end: consumer process, Locust, drain, verification.

Every test runs the consumer as its own process (`cdc-load consumer`), as users do,
on a slot and publication of its own.
"""

from __future__ import annotations

import csv
import json
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import pytest

from services import consumer as consumer_mod
from services import endtoend, eventstore, replication
from services.consumer import Consumer
from services.pool import Pool
from tests.conftest import ROOT, cdc_load_connections
from tests.pipeline import Stack, free_port, start_redis, stop_redis


def dbname(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def checks_ok(report: dict[str, Any]) -> dict[str, int]:
    return {c["name"]: c["violations"] for c in report["checks"]}


@pytest.mark.slow
def test_headless_run_drains_verifies_and_reports_cdc_rows(stack: Stack) -> None:
    proc = stack.start_consumer()
    done = stack.locust(**{"CDC_WORKLOAD__TARGET_OPS": "600"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    report = stack.summary()
    assert report["operations"] == 600
    assert report["passed"] is True
    violations = checks_ok(report["verification"])
    assert len(violations) == 6 and set(violations.values()) == {0}, violations
    assert report["verification"]["lag"]["count"] > 0
    assert report["cdc_live"]["samples"] > 0
    # Propagation is its own request row, in the CSV and in the HTML report.
    with open(stack.tmp / "run_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    assert int(rows[("CDC", "propagation")]["Request Count"]) > 0
    assert "propagation" in (stack.tmp / "run.html").read_text()
    assert "verdict         PASS" in done.stdout
    assert "another command is already in progress" not in log

    assert stack.stop_consumer(proc) == 0
    consumer_log = stack.log()
    assert "consumer stopped:" in consumer_log
    assert f"slot {stack.slot}: confirmed" in consumer_log
    assert cdc_load_connections(stack.db_url, dbname(stack.db_url)) == []


@pytest.mark.slow
def test_without_a_consumer_the_run_fails_verification(stack: Stack) -> None:
    # A consumer made the slot, then stopped: what the load writes never arrives.
    proc = stack.start_consumer()
    assert stack.stop_consumer(proc) == 0
    done = stack.locust(
        **{"CDC_WORKLOAD__TARGET_OPS": "100", "CDC_CDC__DRAIN_TIMEOUT": "1s"}
    )
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    report = stack.summary()
    assert report["passed"] is False
    assert "did not catch up" in report["drain"]["error"]
    assert checks_ok(report["verification"])["transactions_applied_once"] > 0


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_doubles_nothing(stack: Stack) -> None:
    stack.start_consumer()
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def load() -> None:
        result["run"] = stack.locust(
            "--cdc-skip-verify", "-u", "10", **{"CDC_WORKLOAD__TARGET_OPS": "4000"}
        )

    runner = threading.Thread(target=load)
    runner.start()
    rng = random.Random(7)
    kills = 0
    while runner.is_alive() and kills < 4:
        time.sleep(rng.uniform(0.2, 0.7))
        victim = stack.consumers[-1]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        kills += 1
        stack.start_consumer()
    runner.join()
    assert result["run"].returncode == 0, result["run"].stderr[-3000:]
    assert kills >= 2

    endtoend_result = endtoend.drain_and_verify(
        stack.profile(), report_path=stack.tmp / "verification.json"
    )
    assert endtoend_result["passed"], endtoend_result
    assert set(checks_ok(endtoend_result["verification"]).values()) == {0}
    assert stack.stop_consumer(stack.consumers[-1]) == 0


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs."""


def test_crash_between_apply_and_advance_replays_without_effect(
    stack: Stack, conn: psycopg.Connection[Any]
) -> None:
    profile = stack.profile()
    first = Consumer(profile, process="t1")
    first.start()
    pool = Pool(profile.database.url, profile.database.pool, role="test", min_size=1)
    with pool:
        store = eventstore.EventStore(
            pool, write_deadline_s=2, read_deadline_s=1, conflict_attempts=5
        )
        with pool.connection() as c:
            ids = eventstore.create_accounts(c, 5, 1000, batch_size=5)
        for n in range(30):
            store.execute(eventstore.transfer(ids[n % 5], ids[(n + 1) % 5], 7))

    # Crash right after the projection commit, before the slot is told.
    assert first.reader is not None

    def crash(_lsn: int) -> None:
        raise Crash

    first.reader.confirm = crash  # type: ignore[method-assign,assignment]
    with pytest.raises(Crash):
        while first.stats.transactions < 31:
            first.step()
    applied_before = first.stats.transactions
    assert applied_before >= 1
    snapshot = conn.execute(
        "SELECT account_id, balance, version FROM account_projections ORDER BY 1"
    ).fetchall()
    first.reader.close()
    first.writer.close()
    first.pool.close()

    # The restarted consumer gets those transactions again and changes nothing.
    second = Consumer(profile, process="t2")
    second.start()
    stop = threading.Event()
    thread = threading.Thread(target=second.run, args=(stop,))
    thread.start()
    try:
        consumer_mod.drain(profile, timeout_s=20)
    finally:
        stop.set()
        thread.join(30)
    assert second.stats.skipped >= applied_before
    after = conn.execute(
        "SELECT account_id, balance, version FROM account_projections ORDER BY 1"
    ).fetchall()
    assert len(after) == 5
    # Everything was applied before the crash: the replay brought no new event,
    # and the projections are exactly as they were.
    assert second.stats.events == 0
    assert after == snapshot
    report = endtoend.run_verification(profile, report_path=None)
    assert report.passed, [c for c in report.checks if c.violations]


def test_slot_and_publication_created_when_missing_reused_when_present(
    stack: Stack, conn: psycopg.Connection[Any]
) -> None:
    profile = stack.profile()
    checkpoint, created = consumer_mod.prepare(conn, profile)
    assert created is True
    assert checkpoint.applied_transactions == 0
    tables = {
        r[0]
        for r in conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s",
            (stack.publication,),
        ).fetchall()
    }
    assert tables == {"events", "cdc_markers"}
    again, created_again = consumer_mod.prepare(conn, profile)
    assert created_again is False
    assert again == checkpoint
    state = replication.slot_state(conn, stack.slot)
    assert state.active is False
    assert conn.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (stack.slot,)
    ).fetchone() == (1,)


@pytest.mark.slow
def test_redis_stopped_and_started_mid_run(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str
) -> None:
    port = free_port()
    folder = tmp_path / "redis"
    folder.mkdir()
    start_redis(port, folder)
    stack = Stack(tmp_path, db_url, f"redis://127.0.0.1:{port}/0")
    try:
        stack.start_consumer()
        result: dict[str, subprocess.CompletedProcess[str]] = {}

        def load() -> None:
            # Paced, so that the outage falls well inside the load (about 6 s).
            result["run"] = stack.locust(
                "-u",
                "10",
                **{
                    "CDC_WORKLOAD__TARGET_OPS": "3000",
                    "CDC_WORKLOAD__TARGET_RATE": "500",
                },
            )

        runner = threading.Thread(target=load)
        runner.start()
        # Stop Redis once the load is under way, not before it starts.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM events WHERE event_type <> 'AccountOpened'"
            ).fetchone()
            if row is not None and row[0] > 300:
                break
            time.sleep(0.1)
        stop_redis(port)
        time.sleep(1.5)
        start_redis(port, folder)
        runner.join()
        run = result["run"]
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        report = stack.summary()
        # Reads went on from the projections while the cache was away.
        assert report["cache"]["errors"] > 0
        assert report["failures"] == 0
        assert set(checks_ok(report["verification"]).values()) == {0}
        assert stack.stop_consumer(stack.consumers[-1]) == 0
        log = stack.log()
        assert "redis unavailable" in log
        assert "redis back" in log
    finally:
        stack.close()
        stop_redis(port)


@pytest.mark.slow
def test_web_ui_shows_cdc_rows_live(stack: Stack) -> None:
    stack.start_consumer()
    port = free_port()
    proc = stack.web_ui(port, CDC_WORKLOAD__TARGET_OPS="100000")
    try:
        rows: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/stats/requests", timeout=2
                ) as reply:
                    data = json.load(reply)
            except OSError:
                continue
            rows = [r for r in data["stats"] if r["method"] == "CDC"]
            if rows and rows[0]["num_requests"] > 20:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
    assert rows and rows[0]["name"] == "propagation", (rows, err[-3000:])
    assert rows[0]["num_requests"] > 20, err[-3000:]
    assert "another command is already in progress" not in err
    assert stack.stop_consumer(stack.consumers[-1]) == 0
    assert cdc_load_connections(stack.db_url, dbname(stack.db_url)) == []


@pytest.mark.slow
def test_passwords_never_reach_logs_or_reports(
    tmp_path: Path, conn: psycopg.Connection[Any], db_url: str, redis_url: str
) -> None:
    # The test server trusts every login, so a password in the URL is accepted
    # and ignored: enough to see where the harness would print it.
    secret = "hunter2-not-for-logs"
    with_password = db_url.replace("postgres@", f"postgres:{secret}@", 1)
    assert secret in with_password
    stack = Stack(tmp_path, with_password, redis_url)
    try:
        stack.start_consumer()
        done = stack.locust(**{"CDC_WORKLOAD__TARGET_OPS": "200"})
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert stack.stop_consumer(stack.consumers[-1]) == 0
        check = subprocess.run(
            [str(Path(sys.executable).parent / "cdc-load"), "check-config"],
            cwd=ROOT,
            env=stack.env(),
            capture_output=True,
            text=True,
            check=True,
        )
        texts = {
            "locust stdout": done.stdout,
            "locust stderr": done.stderr,
            "consumer log": stack.log(),
            "check-config": check.stdout + check.stderr,
        }
        for path in tmp_path.iterdir():
            if path.is_file():
                texts[path.name] = path.read_text(errors="replace")
        leaked = [name for name, text in texts.items() if secret in text]
        assert leaked == []
        assert "postgres:***@" in check.stdout
    finally:
        stack.close()
