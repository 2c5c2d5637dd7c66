"""Measure the harness against pgbench, then group commit, CDC lag and a soak.

    python -m scripts.bench [--quick] [--soak-minutes N] [--skip-soak]

`make bench` runs it on the private servers of scripts/services.sh. Six steps, each
logged as it goes, then one table of targets, also written to reports/bench.json:

1. transfers only through the harness (direct path, every gate of the optimized
   profile on), through pgbench running the same two statements
   (scripts/bench_transfer.sql) and through a bare psycopg client running them
   with nothing of the harness around it (scripts/bare.py), in alternating
   rounds, at several concurrencies;
2. the batched path at the best concurrency and above: throughput and p99; and
   a bare writer committing batches with the writers' statements, no Locust;
3. what test-before-acquire costs: off, idle connections only, every acquire;
4. CPU of the Locust process per operation, from its rusage (`os.wait4`);
5. CDC lag at 90% of each path's best rate, the consumer in its own process;
6. a soak at full load with the consumer: rates, slot backlog and RSS over time.

It works in the database `cdc_bench` of the server at DATABASE_URL (created if
missing), Redis database 14 of REDIS_URL, and slot and publication names of its
own, so it can share servers with other work. Each round starts from a reset with
1000 accounts. `CDC_` and `LOCUST_` variables of the caller are not passed on: a
round runs the profile and the overrides written here, nothing else. Every child
runs in a session of its own and is stopped on any exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from services import logs
from services.config import load_profile, mask_url
from services.errors import CdcLoadError

logger = logs.get("bench")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LOCUST = str(BIN / "locust")
CDC_LOAD = str(BIN / "cdc-load")
LOCUSTFILE = str(ROOT / "locustfile.py")
PROFILE = str(ROOT / "configs" / "optimized.yaml")
SCRIPT = ROOT / "scripts" / "bench_transfer.sql"
BARE = [sys.executable, "-m", "scripts.bare"]
REPORT_PATH = ROOT / "reports" / "bench.json"

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:54329/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:56379/0"
DATABASE = "cdc_bench"
REDIS_DB = 14
SLOT = "cdc_load_bench_slot"
PUBLICATION = "cdc_load_bench_pub"
#: Accounts of every round: enough that two transfers rarely share one.
ACCOUNTS = 1000
#: Budget of a run limited by time (`-t`), in operations: never reached.
UNLIMITED_OPS = 1_000_000_000
#: Share of a path's best throughput at which its CDC lag is measured.
LAG_RATE_SHARE = 0.9

#: Seconds between two soak samples.
SAMPLE_INTERVAL_S = 10.0
#: The soak's rates are compared over its first this many seconds.
RATE_WINDOW_S = 300.0
#: The soak's growth is measured from this many seconds on (or a quarter of it).
REFERENCE_S = 60.0
#: Slot backlog rise along the soak's trend above which it counts as growing, bytes.
BACKLOG_GROWTH_BYTES = 1024 * 1024
#: How late a sample may come and still belong to its point in time, in seconds.
SAMPLE_SLACK_S = 1.0

TARGET_DIRECT_RATIO = 1.0
TARGET_BATCHED_RATIO = 5.0
TARGET_BATCHED_P99_MS = 50.0
TARGET_LAG_P50_MS = 20.0
TARGET_LAG_P99_MS = 100.0
TARGET_RSS_GROWTH = 0.10
#: Applied rate over produced rate that counts as a consumer keeping up.
TARGET_KEEP_UP = 0.99

#: Limit of a reset and setup of the accounts, in seconds.
SETUP_TIMEOUT_S = 120.0
#: Time a run may take past its `-t` or `-T`, in seconds: Locust's stop timeout
#: (30 s), a drain (60 s) and the verification.
RUN_GRACE_S = 150.0
#: Limit for the consumer to write its ready file, in seconds.
READY_TIMEOUT_S = 60.0
#: Time a child gets to exit after SIGTERM before SIGKILL, in seconds.
STOP_TIMEOUT_S = 30.0
#: How often a wait checks on its child, in seconds.
POLL_S = 0.2
#: Writers and batch size of each bare writer run: the fact sheet's one writer at
#: 50 transfers per transaction, then larger batches.
BARE_WRITERS = ((1, 50), (1, 250), (1, 500))
#: Limit of one query of the soak sampler, in milliseconds.
SAMPLE_QUERY_TIMEOUT_MS = 5000


class BenchError(CdcLoadError):
    """A round could not be run or measured; the message says which and why."""


@dataclass(frozen=True)
class Plan:
    """How many rounds of what length each step runs."""

    #: Users (and pgbench clients) of the throughput step.
    concurrencies: tuple[int, ...]
    #: Rounds of each side at each concurrency.
    rounds: int
    #: Length of a throughput, batched or test-before-acquire round, seconds.
    round_s: int
    #: Users of the batched path above the best direct concurrency.
    batched_users: tuple[int, ...]
    batched_rounds: int
    acquire_rounds: int
    #: Length of each CDC lag run, seconds.
    lag_s: int
    #: Length of the soak, seconds; 0 skips it.
    soak_s: int


def plan_for(*, quick: bool, soak_minutes: float, skip_soak: bool) -> Plan:
    """Return the full plan (about 25 minutes) or the quick one."""
    # The full plan took 23.6 minutes with the 10-minute soak on 2026-12-03, on a
    # busy machine; the quick one about 4 minutes without the soak.
    soak_s = 0 if skip_soak else round(soak_minutes * 60)
    if quick:
        return Plan((10,), 2, 5, (50, 100), 1, 1, 15, soak_s)
    return Plan((5, 10, 20), 2, 15, (20, 50, 100, 200), 2, 2, 60, soak_s)


@dataclass(frozen=True)
class HarnessRun:
    """One headless Locust run, as its summary JSON and its rusage tell it."""

    users: int
    operations: int
    duration_s: float
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    failures: int
    conflicts_retried: int
    cpu_s: float
    exit_code: int
    passed: bool
    lag_count: int | None
    lag_p50_ms: float | None
    lag_p99_ms: float | None
    verification_passed: bool | None


def harness_result(
    summary: Mapping[str, Any], *, users: int, cpu_s: float, exit_code: int
) -> HarnessRun:
    """Read a run's numbers from its `--cdc-summary` JSON.

    Raise `BenchError` if a field the bench needs is missing.
    """
    try:
        verification = summary.get("verification") or {}
        lag = verification.get("lag") or {}
        return HarnessRun(
            users=users,
            operations=int(summary["operations"]),
            duration_s=float(summary["duration_s"]),
            ops_per_s=float(summary["ops_per_s"]),
            p50_ms=float(summary["latency_ms"]["p50"]),
            p99_ms=float(summary["latency_ms"]["p99"]),
            failures=int(summary["failures"]),
            conflicts_retried=int(summary.get("conflicts_retried", 0)),
            cpu_s=cpu_s,
            exit_code=exit_code,
            passed=bool(summary.get("passed")),
            lag_count=_opt_int(lag.get("count")),
            lag_p50_ms=_opt_float(lag.get("p50_ms")),
            lag_p99_ms=_opt_float(lag.get("p99_ms")),
            verification_passed=(
                bool(verification["passed"]) if "passed" in verification else None
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"summary JSON lacks a field the bench reads: {exc}") from exc


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class PgbenchRun:
    """One pgbench run, as its closing lines tell it."""

    clients: int
    tps: float
    transactions: int
    failed: int
    retried: int
    latency_ms: float | None
    #: User + system CPU of the pgbench process, seconds; 0 when not measured.
    cpu_s: float = 0.0


_PGBENCH_FIELDS = {
    "tps": r"^tps = ([\d.]+) \(without initial connection time\)",
    "transactions": r"^number of transactions actually processed: (\d+)",
    "failed": r"^number of failed transactions: (\d+)",
    "retried": r"^number of transactions retried: (\d+)",
    "latency_ms": r"^latency average = ([\d.]+) ms",
}


def parse_pgbench(text: str, *, clients: int) -> PgbenchRun:
    """Read throughput, failures and retries from pgbench's output.

    Raise `BenchError` if there is no `tps = ... (without initial connection time)`
    line. Failure and retry counts missing (no --max-tries) read as 0.
    """
    found: dict[str, str] = {}
    for name, pattern in _PGBENCH_FIELDS.items():
        match = re.search(pattern, text, re.MULTILINE)
        if match is not None:
            found[name] = match.group(1)
    if "tps" not in found or "transactions" not in found:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise BenchError(f"pgbench printed no throughput: {tail or 'no output'}")
    return PgbenchRun(
        clients=clients,
        tps=float(found["tps"]),
        transactions=int(found["transactions"]),
        failed=int(found.get("failed", 0)),
        retried=int(found.get("retried", 0)),
        latency_ms=float(found["latency_ms"]) if "latency_ms" in found else None,
    )


@dataclass(frozen=True)
class BareRun:
    """One run of scripts/bare.py, as its JSON line and its rusage tell it."""

    mode: str
    connections: int
    batch: int
    operations: int
    ops_per_s: float
    #: Batch commit time, p99, ms; None for the direct mode.
    batch_p99_ms: float | None
    cpu_s: float = 0.0


def parse_bare(text: str) -> BareRun:
    """Read a bare run's numbers from the last JSON line of its output.

    Raise `BenchError` if there is none or it lacks a field.
    """
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                found = json.loads(line)
                batch_ms = found.get("batch_ms") or {}
                return BareRun(
                    mode=str(found["mode"]),
                    connections=int(found["connections"]),
                    batch=int(found["batch"]),
                    operations=int(found["operations"]),
                    ops_per_s=float(found["ops_per_s"]),
                    batch_p99_ms=_opt_float(batch_ms.get("p99")),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise BenchError(f"scripts.bare printed a bad result: {exc}") from exc
    tail = " | ".join(text.strip().splitlines()[-2:])
    raise BenchError(f"scripts.bare printed no result: {tail or 'no output'}")


@dataclass(frozen=True)
class SoakSample:
    """One point of the soak, `t_s` seconds after Locust was started."""

    t_s: float
    locust_rss_kb: int
    consumer_rss_kb: int
    backlog_bytes: int
    applied: int
    produced: int


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Return the least-squares slope of (x, y) points; 0 for fewer than two x."""
    n = len(points)
    if n < 2:
        return 0.0
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((x - mean_x) ** 2 for x, _ in points)
    if var == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var


def growth(first: float, last: float) -> float:
    """Return the relative change from `first` to `last` (0.1 is 10% more)."""
    return (last - first) / first if first else 0.0


def analyse_soak(samples: Sequence[SoakSample], *, run_s: float) -> dict[str, Any]:
    """Turn soak samples into rates, backlog trend and RSS growth.

    Only samples taken while the load ran count. Rates are over the first
    `RATE_WINDOW_S` seconds (or the whole soak); growth is from the sample at
    `REFERENCE_S` (or a quarter of a shorter soak) to the last. Raise `BenchError`
    with fewer than two samples.
    """
    load = [s for s in samples if s.t_s <= run_s + SAMPLE_SLACK_S]
    if len(load) < 2:
        raise BenchError(f"the soak has {len(load)} samples; two at least are needed")
    first = load[0]
    window = [s for s in load if s.t_s <= min(RATE_WINDOW_S, run_s) + SAMPLE_SLACK_S]
    last_in_window = window[-1] if len(window) > 1 else load[1]
    span = max(1e-9, last_in_window.t_s - first.t_s)
    produced_rate = (last_in_window.produced - first.produced) / span
    applied_rate = (last_in_window.applied - first.applied) / span

    reference_s = min(REFERENCE_S, run_s / 4)
    later = [s for s in load if s.t_s >= reference_s - SAMPLE_SLACK_S]
    reference = later[0] if len(later) > 1 else load[-2]
    end = load[-1]
    trend = [(s.t_s, float(s.backlog_bytes)) for s in load if s.t_s >= reference.t_s]
    per_s = slope(trend)
    rise = per_s * (end.t_s - reference.t_s)
    return {
        "rate_window_s": round(span, 1),
        "produced_per_s": round(produced_rate, 1),
        "applied_per_s": round(applied_rate, 1),
        "keep_up": round(applied_rate / produced_rate, 4) if produced_rate else None,
        "reference_s": round(reference.t_s, 1),
        "end_s": round(end.t_s, 1),
        "backlog_reference_bytes": reference.backlog_bytes,
        "backlog_end_bytes": end.backlog_bytes,
        "backlog_max_bytes": max(s.backlog_bytes for s in load),
        "backlog_trend_bytes_per_min": round(per_s * 60, 1),
        "backlog_grew": rise > BACKLOG_GROWTH_BYTES,
        "locust_rss_kb": [reference.locust_rss_kb, end.locust_rss_kb],
        "consumer_rss_kb": [reference.consumer_rss_kb, end.consumer_rss_kb],
        "locust_rss_growth": round(
            growth(reference.locust_rss_kb, end.locust_rss_kb), 4
        ),
        "consumer_rss_growth": round(
            growth(reference.consumer_rss_kb, end.consumer_rss_kb), 4
        ),
    }


# Child processes.


class Children:
    """Every child the bench started, so that none outlives it.

    Each runs in a session of its own: Ctrl-C reaches only the bench, which then
    stops them in order, rather than every process at once mid-write. They run in
    `cwd`, where a verified run writes its reports/verification.json: the
    checkout's reports belong to the load runs, not to the bench.
    """

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self._live: dict[int, subprocess.Popen[bytes]] = {}
        self._names: dict[int, str] = {}
        self._logs: dict[int, Path] = {}

    def start(
        self, argv: Sequence[str], *, env: Mapping[str, str], log: Path
    ) -> subprocess.Popen[bytes]:
        """Start `argv` with its output in `log`."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                cwd=self.cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._live[proc.pid] = proc
        self._names[proc.pid] = Path(argv[0]).name
        self._logs[proc.pid] = log
        logger.debug("started %s as pid %s", self._names[proc.pid], proc.pid)
        return proc

    def wait(
        self,
        proc: subprocess.Popen[bytes],
        *,
        timeout_s: float,
        tick: Callable[[], None] | None = None,
    ) -> tuple[int, float]:
        """Wait for `proc`; return its exit code and its user + system CPU seconds.

        Call `tick` at every poll meanwhile. Past `timeout_s`, stop it and raise
        `BenchError`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            reaped = self._reap(proc, block=False)
            if reaped is not None:
                return reaped
            if time.monotonic() > deadline:
                self.stop(proc)
                raise BenchError(
                    f"{self._names[proc.pid]} (pid {proc.pid}) still ran after"
                    f" {timeout_s:g} s"
                )
            if tick is not None:
                tick()
            time.sleep(POLL_S)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        timeout_s: float,
    ) -> tuple[int, str, float]:
        """Run `argv` to its end; return its exit code, output and CPU seconds."""
        start = log.stat().st_size if log.exists() else 0
        proc = self.start(argv, env=env, log=log)
        code, cpu_s = self.wait(proc, timeout_s=timeout_s)
        with log.open("rb") as f:
            f.seek(start)
            return code, f.read().decode(errors="replace"), cpu_s

    def stop(self, proc: subprocess.Popen[bytes]) -> int:
        """SIGTERM the child's session, SIGKILL it if it lingers; return its code."""
        if proc.pid not in self._live:
            return int(proc.returncode)
        self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            reaped = self._reap(proc, block=False)
            if reaped is not None:
                return reaped[0]
            time.sleep(POLL_S)
        logger.warning(
            "pid %s ignored SIGTERM for %g s: killing it", proc.pid, STOP_TIMEOUT_S
        )
        self._signal(proc, signal.SIGKILL)
        reaped = self._reap(proc, block=True)
        assert reaped is not None
        return reaped[0]

    def log_of(self, proc: subprocess.Popen[bytes]) -> Path:
        """Return the file that holds the child's output."""
        return self._logs[proc.pid]

    def exited(self, proc: subprocess.Popen[bytes]) -> int | None:
        """Return the child's exit code if it has exited, else None."""
        if proc.pid not in self._live:
            return int(proc.returncode)
        reaped = self._reap(proc, block=False)
        return None if reaped is None else reaped[0]

    def stop_all(self) -> None:
        """Stop every child still running, newest first (Locust before consumer)."""
        for proc in reversed(list(self._live.values())):
            self.stop(proc)

    def _signal(self, proc: subprocess.Popen[bytes], signum: int) -> None:
        # Gone already: there is nothing left to stop.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    def _reap(
        self, proc: subprocess.Popen[bytes], *, block: bool
    ) -> tuple[int, float] | None:
        # os.wait4 rather than Popen.wait: it hands back the child's own rusage,
        # which is the CPU of that one process, not of all children together.
        try:
            pid, status, usage = os.wait4(proc.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            # Reaped already, by a wait that an interrupt cut short.
            self._live.pop(proc.pid, None)
            proc.returncode = -1
            return -1, 0.0
        if pid == 0:
            return None
        proc.returncode = os.waitstatus_to_exitcode(status)
        del self._live[proc.pid]
        return proc.returncode, usage.ru_utime + usage.ru_stime


def rss_kb(pid: int) -> int:
    """Return a process's resident set size in kB (VmRSS), 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


# The bench.


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def with_path(url: str, path: str) -> str:
    """Return `url` with its path (database name or Redis db) replaced."""
    return urlunsplit(urlsplit(url)._replace(path="/" + path))


class Bench:
    """The servers, the environment of every round, and the children."""

    def __init__(self, server_url: str, redis_url: str, logdir: Path) -> None:
        self.server_url = server_url
        self.url = with_path(server_url, DATABASE)
        self.redis_url = with_path(redis_url, str(REDIS_DB))
        self.logdir = logdir
        self.children = Children(logdir)
        self._runs = 0
        inherited = {
            k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "LOCUST_"))
        }
        self.env: dict[str, str] = {
            **inherited,
            "DATABASE_URL": self.url,
            "REDIS_URL": self.redis_url,
            "CDC_CDC__SLOT_NAME": SLOT,
            "CDC_CDC__PUBLICATION_NAME": PUBLICATION,
            "CDC_WORKLOAD__ACCOUNT_COUNT": str(ACCOUNTS),
            "CDC_WORKLOAD__TARGET_OPS": str(UNLIMITED_OPS),
            # Transfers only: the one command pgbench runs too.
            "CDC_WORKLOAD__WEIGHTS__DEPOSIT": "0",
            "CDC_WORKLOAD__WEIGHTS__WITHDRAW": "0",
            "CDC_WORKLOAD__WEIGHTS__BALANCE": "0",
            "CDC_WORKLOAD__WEIGHTS__OPEN_ACCOUNT": "0",
            "CDC_WORKLOAD__WEIGHTS__TRANSFER": "1",
        }
        profile = load_profile(PROFILE, environ=self.env)
        self.max_amount = profile.workload.max_amount
        self.conflict_attempts = profile.event_store.conflict_attempts

    def create_database(self) -> str:
        """Create the bench's database if missing; return the server's version.

        Raise `BenchError` if the server does not answer.
        """
        try:
            with psycopg.connect(
                self.server_url, autocommit=True, connect_timeout=10
            ) as c:
                row = c.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                ).fetchone()
                if row is None:
                    c.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE))
                    )
                    logger.info("created database %s", DATABASE)
                version = c.execute("SHOW server_version").fetchone()
        except psycopg.Error as exc:
            raise BenchError(
                f"cannot use the server at {mask_url(self.server_url)}: {_line(exc)}"
            ) from exc
        return str(version[0]) if version else "unknown"

    def drop_slot(self) -> None:
        """Drop the bench's slot if it is left and idle: it would hold WAL forever."""
        try:
            with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as c:
                c.execute(
                    "SELECT pg_drop_replication_slot(slot_name)"
                    " FROM pg_replication_slots WHERE slot_name = %s AND NOT active",
                    (SLOT,),
                )
        except psycopg.Error as exc:
            logger.warning("could not drop slot %s: %s", SLOT, exc)

    def _log(self, name: str) -> Path:
        self._runs += 1
        return self.logdir / f"{self._runs:03d}-{name}.log"

    def reset(self, *, accounts: bool = True) -> None:
        """Empty the event store and drop the slot; open the accounts again.

        Without `accounts`, the run opens them itself, after its consumer has made
        its slot: the consumer must see every account opened, or the first
        transfer on one is an event out of order for its projection.
        """
        command = ["setup", "--reset"] if accounts else ["reset"]
        argv = [CDC_LOAD, *command, "--profile", PROFILE]
        log = self._log(command[0])
        code, out, _cpu_s = self.children.run(
            argv, env=self.env, log=log, timeout_s=SETUP_TIMEOUT_S
        )
        if code != 0:
            tail = " | ".join(out.strip().splitlines()[-2:])
            raise BenchError(f"cdc-load {' '.join(command)} exited {code}: {tail}")

    def pgbench(self, *, clients: int, seconds: int) -> PgbenchRun:
        """Run the transfer script with `clients` for `seconds`, after a reset."""
        self.reset()
        argv = [
            shutil.which("pgbench") or "pgbench",
            "--no-vacuum",
            "--protocol=prepared",
            f"--client={clients}",
            # One thread, as the harness is one process.
            "--jobs=1",
            f"--time={seconds}",
            f"--max-tries={self.conflict_attempts}",
            f"--define=accounts={ACCOUNTS}",
            f"--define=max_amount={self.max_amount}",
            f"--file={SCRIPT}",
            self.url,
        ]
        log = self._log(f"pgbench-{clients}")
        code, out, cpu_s = self.children.run(
            argv, env=self.env, log=log, timeout_s=seconds + RUN_GRACE_S
        )
        if code != 0:
            raise BenchError(f"pgbench exited {code}; see {log}")
        return dataclasses.replace(parse_pgbench(out, clients=clients), cpu_s=cpu_s)

    def bare(
        self, mode: str, *, connections: int, seconds: int, batch: int = 1
    ) -> BareRun:
        """Run scripts/bare.py in `mode` for `seconds`, after a reset."""
        self.reset()
        count = "--clients" if mode == "direct" else "--writers"
        argv = [
            *BARE,
            mode,
            count,
            str(connections),
            "--batch",
            str(batch),
            "--seconds",
            str(seconds),
            "--accounts",
            str(ACCOUNTS),
            "--max-amount",
            str(self.max_amount),
            "--attempts",
            str(self.conflict_attempts),
        ]
        log = self._log(f"bare-{mode}-{connections}x{batch}")
        env = {**self.env, "PYTHONPATH": str(ROOT)}
        code, out, cpu_s = self.children.run(
            argv, env=env, log=log, timeout_s=seconds + RUN_GRACE_S
        )
        if code != 0:
            raise BenchError(f"scripts.bare exited {code}; see {log}")
        return dataclasses.replace(parse_bare(out), cpu_s=cpu_s)

    def harness(
        self,
        name: str,
        *,
        users: int,
        seconds: int,
        env: Mapping[str, str] | None = None,
        verify: bool = False,
        target_ops: int | None = None,
        on_start: Callable[[int, int], Callable[[], None]] | None = None,
    ) -> HarnessRun:
        """Run Locust headless for `seconds` after a reset; return its numbers.

        With `verify`, a consumer runs in its own process around it and the run
        drains and verifies at its end. `on_start(locust_pid, consumer_pid)` may
        return a function that is called at every poll while Locust runs. Raise
        `BenchError` if Locust exits without a summary or overruns its time.
        """
        self.reset(accounts=not verify)
        run_env = {**self.env, "CDC_WORKLOAD__USERS": str(users), **(env or {})}
        if target_ops is not None:
            run_env["CDC_WORKLOAD__TARGET_OPS"] = str(target_ops)
        consumer = self.start_consumer(run_env) if verify else None
        log = self._log(name)
        summary_path = log.with_name(f"{log.stem}-summary.json")
        argv = [
            LOCUST,
            "-f",
            LOCUSTFILE,
            "--headless",
            "--only-summary",
            "--cdc-profile",
            PROFILE,
            "-u",
            str(users),
            "-t",
            f"{seconds}s",
            "--cdc-summary",
            str(summary_path),
            *([] if verify else ["--cdc-skip-verify"]),
        ]
        consumer_code = 0
        proc: subprocess.Popen[bytes] | None = None
        try:
            proc = self.children.start(argv, env=run_env, log=log)
            tick = (
                on_start(proc.pid, consumer.pid if consumer else 0)
                if on_start
                else None
            )
            code, cpu_s = self.children.wait(
                proc, timeout_s=seconds + RUN_GRACE_S, tick=tick
            )
        finally:
            # Locust first, on an interrupt too: a consumer stopped under a running
            # load would only make its drain wait out its timeout.
            if proc is not None:
                self.children.stop(proc)
            if consumer is not None:
                consumer_code = self.children.stop(consumer)
        if consumer is not None and consumer_code != 0:
            # Its lag and the run's verification would describe a dead consumer.
            raise BenchError(
                f"the consumer exited {consumer_code};"
                f" see {self.children.log_of(consumer)}"
            )
        if not summary_path.exists():
            raise BenchError(f"locust exited {code} without a summary; see {log}")
        summary = json.loads(summary_path.read_text())
        return harness_result(summary, users=users, cpu_s=cpu_s, exit_code=code)

    def start_consumer(self, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """Start `cdc-load consumer` and wait for its ready file.

        Raise `BenchError` if it exits first or is not ready in time.
        """
        log = self._log("consumer")
        ready = log.with_suffix(".ready")
        argv = [CDC_LOAD, "consumer", "--profile", PROFILE, "--ready-file", str(ready)]
        proc = self.children.start(argv, env=env, log=log)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            code = self.children.exited(proc)
            if code is not None:
                raise BenchError(f"the consumer exited {code}; see {log}")
            if time.monotonic() > deadline:
                self.children.stop(proc)
                raise BenchError(f"the consumer was not ready in {READY_TIMEOUT_S} s")
            time.sleep(POLL_S)
        return proc


# The steps.


def best_of(runs: Sequence[HarnessRun]) -> HarnessRun:
    """Return the run of highest throughput."""
    return max(runs, key=lambda r: r.ops_per_s)


def step_throughput(bench: Bench, plan: Plan) -> dict[str, Any]:
    """Run harness, pgbench and the bare client in alternating rounds per level."""
    harness_runs: list[HarnessRun] = []
    pgbench_runs: list[PgbenchRun] = []
    bare_runs: list[BareRun] = []
    levels: list[dict[str, Any]] = []
    for users in plan.concurrencies:
        mine: list[HarnessRun] = []
        theirs: list[PgbenchRun] = []
        bare: list[BareRun] = []
        for n in range(1, plan.rounds + 1):
            h = bench.harness(f"direct-{users}", users=users, seconds=plan.round_s)
            mine.append(h)
            p = bench.pgbench(clients=users, seconds=plan.round_s)
            theirs.append(p)
            b = bench.bare("direct", connections=users, seconds=plan.round_s)
            bare.append(b)
            logger.info(
                "throughput at %s users, round %s of %s: harness %.0f ops/s"
                " (p99 %.0f ms, %s conflicts retried), pgbench %.0f tps (%s retried),"
                " bare psycopg %.0f ops/s",
                users,
                n,
                plan.rounds,
                h.ops_per_s,
                h.p99_ms,
                h.conflicts_retried,
                p.tps,
                p.retried,
                b.ops_per_s,
            )
        harness_runs += mine
        pgbench_runs += theirs
        bare_runs += bare
        h_best = best_of(mine).ops_per_s
        p_best = max(p.tps for p in theirs)
        b_best = max(b.ops_per_s for b in bare)
        levels.append(
            {
                "users": users,
                "harness_ops_per_s": h_best,
                "pgbench_tps": p_best,
                "bare_ops_per_s": b_best,
                "ratio": _ratio(h_best, p_best),
                "bare_ratio": _ratio(b_best, p_best),
            }
        )
    h_top = best_of(harness_runs)
    p_top = max(pgbench_runs, key=lambda p: p.tps)
    b_top = max(bare_runs, key=lambda b: b.ops_per_s)
    return {
        "seconds_per_round": plan.round_s,
        "rounds_per_side": plan.rounds,
        "levels": levels,
        "best_harness": {"users": h_top.users, "ops_per_s": h_top.ops_per_s},
        "best_pgbench": {"clients": p_top.clients, "tps": p_top.tps},
        "best_bare": {"clients": b_top.connections, "ops_per_s": b_top.ops_per_s},
        "ratio": _ratio(h_top.ops_per_s, p_top.tps),
        # The Python client's own ceiling against pgbench, and how much of it the
        # harness keeps with Locust, the pool and every gate on.
        "bare_ratio": _ratio(b_top.ops_per_s, p_top.tps),
        "harness_to_bare": _ratio(h_top.ops_per_s, b_top.ops_per_s),
        "harness_runs": [dataclasses.asdict(r) for r in harness_runs],
        "pgbench_runs": [dataclasses.asdict(r) for r in pgbench_runs],
        "bare_runs": [dataclasses.asdict(r) for r in bare_runs],
    }


def _ratio(mine: float, theirs: float) -> float | None:
    return round(mine / theirs, 3) if theirs else None


BATCHED = {"CDC_EVENT_STORE__WRITE_PATH": "batched"}


def step_batched(
    bench: Bench, plan: Plan, best_users: int, pgbench_tps: float
) -> dict[str, Any]:
    """Run the batched path at the best direct concurrency and the levels above.

    Then the bare writer at each of `BARE_WRITERS`: what the writers' statements
    commit with no Locust, queue or callers, the ceiling of the batched path.
    """
    levels = sorted({best_users, *(u for u in plan.batched_users if u > best_users)})
    runs: list[HarnessRun] = []
    bare: list[BareRun] = []
    for n in range(1, plan.batched_rounds + 1):
        for users in levels:
            run = bench.harness(
                f"batched-{users}", users=users, seconds=plan.round_s, env=BATCHED
            )
            runs.append(run)
            logger.info(
                "batched at %s users, round %s of %s: %.0f ops/s, p99 %.0f ms",
                users,
                n,
                plan.batched_rounds,
                run.ops_per_s,
                run.p99_ms,
            )
        for writers, size in BARE_WRITERS:
            b = bench.bare(
                "batched", connections=writers, batch=size, seconds=plan.round_s
            )
            bare.append(b)
            logger.info(
                "bare writer, %s x batches of %s, round %s of %s: %.0f ops/s,"
                " batch commit p99 %s ms",
                writers,
                size,
                n,
                plan.batched_rounds,
                b.ops_per_s,
                _num(b.batch_p99_ms),
            )
    top = best_of(runs)
    within = [r for r in runs if r.p99_ms <= TARGET_BATCHED_P99_MS]
    top_within = best_of(within) if within else None
    # A caller waits at least for its batch's commit: a bare batch p99 within the
    # limit is the most an operation p99 within it could allow.
    bare_within = [b for b in bare if (b.batch_p99_ms or 0.0) <= TARGET_BATCHED_P99_MS]
    bare_top = max(bare_within or bare, key=lambda b: b.ops_per_s)
    return {
        "levels": levels,
        "best": {
            "users": top.users,
            "ops_per_s": top.ops_per_s,
            "p99_ms": top.p99_ms,
            "ratio_to_pgbench": _ratio(top.ops_per_s, pgbench_tps),
        },
        "best_within_p99": (
            {
                "users": top_within.users,
                "ops_per_s": top_within.ops_per_s,
                "p99_ms": top_within.p99_ms,
                "ratio_to_pgbench": _ratio(top_within.ops_per_s, pgbench_tps),
            }
            if top_within
            else None
        ),
        "best_bare": {
            "writers": bare_top.connections,
            "batch": bare_top.batch,
            "ops_per_s": bare_top.ops_per_s,
            "batch_p99_ms": bare_top.batch_p99_ms,
            "within_p99": bool(bare_within),
            "ratio_to_pgbench": _ratio(bare_top.ops_per_s, pgbench_tps),
        },
        "runs": [dataclasses.asdict(r) for r in runs],
        "bare_runs": [dataclasses.asdict(b) for b in bare],
    }


ACQUIRE_VARIANTS = {
    "off": {"CDC_DATABASE__POOL__TEST_BEFORE_ACQUIRE": "false"},
    "idle_5s": {
        "CDC_DATABASE__POOL__TEST_BEFORE_ACQUIRE": "true",
        "CDC_DATABASE__POOL__IDLE_CHECK_AFTER": "5s",
    },
    "every_acquire": {
        "CDC_DATABASE__POOL__TEST_BEFORE_ACQUIRE": "true",
        "CDC_DATABASE__POOL__IDLE_CHECK_AFTER": "0",
    },
}


def step_acquire_check(bench: Bench, plan: Plan, users: int) -> dict[str, Any]:
    """Compare the direct path with the check off, on idle connections, always."""
    runs: dict[str, list[HarnessRun]] = {name: [] for name in ACQUIRE_VARIANTS}
    for n in range(1, plan.acquire_rounds + 1):
        # Alternating, so that a change in the machine's load hits every variant.
        for name, env in ACQUIRE_VARIANTS.items():
            run = bench.harness(
                f"acquire-{name}", users=users, seconds=plan.round_s, env=env
            )
            runs[name].append(run)
            logger.info(
                "test before acquire %s, round %s of %s: %.0f ops/s",
                name,
                n,
                plan.acquire_rounds,
                run.ops_per_s,
            )
    best = {name: best_of(r).ops_per_s for name, r in runs.items()}
    base = best["off"]
    return {
        "users": users,
        "ops_per_s": best,
        "ratio_to_off": {name: _ratio(v, base) for name, v in best.items()},
        "runs": {
            name: [dataclasses.asdict(r) for r in rs] for name, rs in runs.items()
        },
    }


def step_cpu(
    bench: Bench,
    direct: Sequence[HarnessRun],
    batched: Sequence[HarnessRun],
    pgbench: Sequence[PgbenchRun],
) -> dict[str, Any]:
    """CPU per operation of the Locust process, whole and net of its fixed cost.

    The fixed cost (interpreter start, imports, pools, teardown) is measured by a
    run of one operation per path and subtracted to give the per-operation cost
    under load. pgbench's own CPU per transaction is given beside it: the client
    shares the machine's cores with the server.
    """
    # TODO(one sample of the fixed cost): it varies with the machine's load by a
    # few tenths of a second, which moves the net figure of a short (quick) round
    # by tens of percent; rounds of 15 s keep that under about 10%.
    result: dict[str, Any] = {}
    for path, runs, env in (("direct", direct, {}), ("batched", batched, BATCHED)):
        fixed = bench.harness(
            f"fixed-{path}", users=1, seconds=30, env=env, target_ops=1
        )
        whole = [r.cpu_s / r.operations * 1e6 for r in runs if r.operations]
        net = [
            max(0.0, r.cpu_s - fixed.cpu_s) / r.operations * 1e6
            for r in runs
            if r.operations
        ]
        result[path] = {
            "runs": len(whole),
            "us_per_op": round(min(whole), 1) if whole else None,
            "us_per_op_net": round(min(net), 1) if net else None,
            "fixed_cpu_s": round(fixed.cpu_s, 3),
            "cpu_s": [round(r.cpu_s, 3) for r in runs],
            "operations": [r.operations for r in runs],
        }
        logger.info(
            "cpu of the locust process, %s path: %s us/op (%s us/op net of the"
            " %.2f s fixed cost)",
            path,
            result[path]["us_per_op"],
            result[path]["us_per_op_net"],
            fixed.cpu_s,
        )
    per_tx = [p.cpu_s / p.transactions * 1e6 for p in pgbench if p.transactions]
    result["pgbench"] = {"us_per_tx": round(min(per_tx), 1) if per_tx else None}
    logger.info("cpu of pgbench: %s us/transaction", result["pgbench"]["us_per_tx"])
    return result


def step_lag(
    bench: Bench, plan: Plan, direct: HarnessRun, batched: HarnessRun
) -> dict[str, Any]:
    """Measure CDC lag at 90% of each path's best rate, verification on."""
    result: dict[str, Any] = {}
    for path, best, env in (("direct", direct, {}), ("batched", batched, BATCHED)):
        rate = round(LAG_RATE_SHARE * best.ops_per_s, 1)
        paced = {**env, "CDC_WORKLOAD__TARGET_RATE": str(rate)}
        run = bench.harness(
            f"lag-{path}", users=best.users, seconds=plan.lag_s, env=paced, verify=True
        )
        result[path] = {
            "users": best.users,
            "target_rate": rate,
            "achieved_ops_per_s": run.ops_per_s,
            "lag_count": run.lag_count,
            "lag_p50_ms": run.lag_p50_ms,
            "lag_p99_ms": run.lag_p99_ms,
            "verification_passed": run.verification_passed,
            "run": dataclasses.asdict(run),
        }
        logger.info(
            "cdc lag, %s path at %.0f ops/s asked, %.0f achieved: p50 %s ms,"
            " p99 %s ms over %s transactions",
            path,
            rate,
            run.ops_per_s,
            _num(run.lag_p50_ms),
            _num(run.lag_p99_ms),
            run.lag_count,
        )
    return result


class SoakSampler:
    """Every `SAMPLE_INTERVAL_S`: RSS of both processes, slot backlog, counts.

    Produced transactions are counted as new distinct txids of `events`, scanned
    from the highest position seen two samples ago: a transaction that took a
    position before then has committed or aborted since (a write cannot outlast
    its deadline of a few seconds), so it cannot be missed, and txids already
    counted are remembered until they fall below that floor.
    """

    def __init__(self, url: str, locust_pid: int, consumer_pid: int) -> None:
        self.locust_pid = locust_pid
        self.consumer_pid = consumer_pid
        self.samples: list[SoakSample] = []
        try:
            self._conn = psycopg.connect(
                url,
                autocommit=True,
                connect_timeout=10,
                options=f"-c statement_timeout={SAMPLE_QUERY_TIMEOUT_MS}",
            )
        except psycopg.Error as exc:
            raise BenchError(f"the soak sampler cannot connect: {_line(exc)}") from exc
        try:
            top = self._conn.execute(
                "SELECT coalesce(max(position), 0) FROM events"
            ).fetchone()
        except psycopg.Error as exc:
            self._conn.close()
            raise BenchError(f"the soak sampler cannot read: {_line(exc)}") from exc
        self._floor = int(top[0]) if top else 0
        self._previous_top = self._floor
        self._seen: dict[str, int] = {}
        self._produced = 0
        self._started = time.monotonic()
        self._due = self._started

    def __call__(self) -> None:
        """Take a sample if one is due."""
        now = time.monotonic()
        if now < self._due:
            return
        self._due += SAMPLE_INTERVAL_S
        try:
            sample = self._sample(now - self._started)
        except psycopg.Error as exc:
            logger.warning("soak sample skipped: %s", exc)
            return
        self.samples.append(sample)
        logger.info(
            "soak at %.0f s: produced %s, applied %s, backlog %s bytes,"
            " rss locust %s kB, consumer %s kB",
            sample.t_s,
            sample.produced,
            sample.applied,
            sample.backlog_bytes,
            sample.locust_rss_kb,
            sample.consumer_rss_kb,
        )

    def _sample(self, t_s: float) -> SoakSample:
        conn = self._conn
        # One snapshot for the three reads: the consumer's count read a moment
        # after the events would run ahead of them by the commits in between.
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            rows = conn.execute(
                "SELECT txid::text, max(position) FROM events WHERE position > %s"
                " GROUP BY txid",
                (self._floor,),
            ).fetchall()
            applied = conn.execute(
                "SELECT applied_transactions FROM cdc_checkpoint WHERE slot_name = %s",
                (SLOT,),
            ).fetchone()
            backlog = conn.execute(
                "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint"
                " FROM pg_replication_slots WHERE slot_name = %s",
                (SLOT,),
            ).fetchone()

        top = self._previous_top
        for txid, position in rows:
            top = max(top, int(position))
            if txid not in self._seen:
                self._produced += 1
                self._seen[txid] = int(position)
        self._floor, self._previous_top = self._previous_top, top
        self._seen = {t: p for t, p in self._seen.items() if p > self._floor}
        return SoakSample(
            t_s=round(t_s, 2),
            locust_rss_kb=rss_kb(self.locust_pid),
            consumer_rss_kb=rss_kb(self.consumer_pid),
            backlog_bytes=int(backlog[0]) if backlog and backlog[0] is not None else 0,
            applied=int(applied[0]) if applied else 0,
            produced=self._produced,
        )

    def close(self) -> None:
        """Close the sampler's connection."""
        self._conn.close()


def step_soak(bench: Bench, plan: Plan, users: int) -> dict[str, Any]:
    """Run full load with the consumer for the soak's length, sampling it."""
    samplers: list[SoakSampler] = []

    def on_start(locust_pid: int, consumer_pid: int) -> Callable[[], None]:
        sampler = SoakSampler(bench.url, locust_pid, consumer_pid)
        samplers.append(sampler)
        return sampler

    logger.info(
        "soak: %s users, direct path, %s s, consumer running", users, plan.soak_s
    )
    try:
        run = bench.harness(
            "soak", users=users, seconds=plan.soak_s, verify=True, on_start=on_start
        )
    finally:
        for sampler in samplers:
            sampler.close()
    samples = samplers[0].samples if samplers else []
    analysis = analyse_soak(samples, run_s=plan.soak_s)
    return {
        "users": users,
        "seconds": plan.soak_s,
        "ops_per_s": run.ops_per_s,
        "verification_passed": run.verification_passed,
        **analysis,
        "samples": [dataclasses.asdict(s) for s in samples],
        "run": dataclasses.asdict(run),
    }


# The report.


@dataclass(frozen=True)
class Target:
    """One line of the final table; `met` is None for a figure without a target."""

    name: str
    required: str
    measured: str
    met: bool | None


def targets(report: Mapping[str, Any]) -> list[Target]:
    """Judge the measured values against the targets."""
    rows: list[Target] = []
    tp = report.get("throughput")
    if tp and tp["ratio"] is not None:
        rows.append(
            Target(
                "direct path / pgbench, best",
                f">= {TARGET_DIRECT_RATIO:.2f}",
                f"{tp['ratio']:.2f}",
                tp["ratio"] >= TARGET_DIRECT_RATIO,
            )
        )
    if tp and tp.get("bare_ratio") is not None:
        rows.append(
            Target(
                "bare psycopg / pgbench (ceiling)", "-", _num(tp["bare_ratio"], 2), None
            )
        )
        rows.append(
            Target(
                "direct path / bare psycopg", "-", _num(tp["harness_to_bare"], 2), None
            )
        )
    b = report.get("batched")
    if b and b["best"]["ratio_to_pgbench"] is not None:
        # The target holds both at once: the rate counts only within the p99 limit.
        judged = b.get("best_within_p99") or b["best"]
        ratio = judged["ratio_to_pgbench"]
        rows.append(
            Target(
                "batched / pgbench best, p99 within",
                f">= {TARGET_BATCHED_RATIO:.1f}",
                f"{ratio:.2f} ({judged['users']} users)",
                ratio >= TARGET_BATCHED_RATIO
                and judged["p99_ms"] <= TARGET_BATCHED_P99_MS,
            )
        )
        rows.append(
            Target(
                "batched p99 at that rate, ms",
                f"<= {TARGET_BATCHED_P99_MS:.0f}",
                f"{judged['p99_ms']:.0f}",
                judged["p99_ms"] <= TARGET_BATCHED_P99_MS,
            )
        )
        bare = b.get("best_bare")
        if bare and bare["ratio_to_pgbench"] is not None:
            rows.append(
                Target(
                    "bare writer / pgbench (ceiling)",
                    "-",
                    f"{bare['ratio_to_pgbench']:.2f}"
                    f" ({bare['writers']} x {bare['batch']})",
                    None,
                )
            )
    acq = report.get("acquire_check")
    if acq:
        for name in ("idle_5s", "every_acquire"):
            ratio = acq["ratio_to_off"][name]
            rows.append(
                Target(f"test before acquire {name} / off", "-", _num(ratio, 2), None)
            )
    cpu = report.get("cpu")
    if cpu:
        for path in ("direct", "batched"):
            c = cpu[path]
            rows.append(
                Target(
                    f"locust cpu per op, {path}, us",
                    "-",
                    f"{_num(c['us_per_op'])} ({_num(c['us_per_op_net'])} net)",
                    None,
                )
            )
        rows.append(
            Target(
                "pgbench cpu per transaction, us",
                "-",
                _num(cpu["pgbench"]["us_per_tx"]),
                None,
            )
        )
    lag = report.get("lag")
    if lag:
        for path in ("direct", "batched"):
            entry = lag[path]
            for q, limit in (("p50", TARGET_LAG_P50_MS), ("p99", TARGET_LAG_P99_MS)):
                value = entry[f"lag_{q}_ms"]
                rows.append(
                    Target(
                        f"cdc lag {q} ms, {path}, {entry['achieved_ops_per_s']:.0f}/s",
                        f"<= {limit:.0f}",
                        _num(value),
                        value is not None and value <= limit,
                    )
                )
    soak = report.get("soak")
    if soak:
        keep = soak["keep_up"]
        rows.append(
            Target(
                "soak applied / produced rate",
                f">= {TARGET_KEEP_UP:.2f}",
                _num(keep, 3),
                keep is not None and keep >= TARGET_KEEP_UP,
            )
        )
        rows.append(
            Target(
                "soak slot backlog grew",
                "no",
                f"{'yes' if soak['backlog_grew'] else 'no'}"
                f" ({soak['backlog_trend_bytes_per_min']:.0f} B/min)",
                not soak["backlog_grew"],
            )
        )
        for who in ("locust", "consumer"):
            g = soak[f"{who}_rss_growth"]
            rows.append(
                Target(
                    f"soak {who} rss growth",
                    f"<= {TARGET_RSS_GROWTH:.0%}",
                    f"{g:+.1%}",
                    g <= TARGET_RSS_GROWTH,
                )
            )
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(report: Mapping[str, Any]) -> list[str]:
    """Format the report as text lines: the details of each step, then targets."""
    m = report["machine"]
    lines = [
        "",
        f"cdc-load bench, {report['date']}, {m['nproc']} cpus,"
        f" {m['memory_gib']:.1f} GiB, PostgreSQL {m['postgresql']},"
        f" {report['mode']} plan, load average {m['load_average'][0]:.1f} at the"
        f" start, {report.get('load_average_end', 0.0):.1f} at the end,"
        f" {report['elapsed_s'] / 60:.1f} min",
    ]
    tp = report.get("throughput")
    if tp:
        lines += [
            f"throughput, transfers only, best of {tp['rounds_per_side']} rounds"
            f" of {tp['seconds_per_round']} s each side",
            "  users  harness ops/s  pgbench tps  bare ops/s  ratio  bare ratio",
        ]
        for lv in tp["levels"]:
            lines.append(
                f"  {lv['users']:>5}  {lv['harness_ops_per_s']:>13.0f}"
                f"  {lv['pgbench_tps']:>11.0f}  {lv['bare_ops_per_s']:>10.0f}"
                f"  {_num(lv['ratio'], 2):>5}  {_num(lv['bare_ratio'], 2):>10}"
            )
        bh, bp, bb = tp["best_harness"], tp["best_pgbench"], tp["best_bare"]
        lines.append(
            f"  best   {bh['ops_per_s']:.0f} ops/s at {bh['users']} users,"
            f" pgbench {bp['tps']:.0f} tps at {bp['clients']} clients,"
            f" bare {bb['ops_per_s']:.0f} ops/s at {bb['clients']},"
            f" ratio {_num(tp['ratio'], 2)}"
        )
    b = report.get("batched")
    if b:
        lines.append("batched path (group commit)")
        lines.append("  users  ops/s  p50 ms  p99 ms")
        for r in b["runs"]:
            lines.append(
                f"  {r['users']:>5}  {r['ops_per_s']:>5.0f}  {r['p50_ms']:>6.0f}"
                f"  {r['p99_ms']:>6.0f}"
            )
        lines.append("bare writer (no Locust): writers x batch, ops/s, commit p99 ms")
        for r in b.get("bare_runs", []):
            lines.append(
                f"  {r['connections']} x {r['batch']:<5} {r['ops_per_s']:>6.0f}"
                f"  {_num(r['batch_p99_ms']):>6}"
            )
    acq = report.get("acquire_check")
    if acq:
        lines.append(f"test before acquire, direct path, {acq['users']} users")
        for name, ops in acq["ops_per_s"].items():
            lines.append(
                f"  {name:<14} {ops:>6.0f} ops/s  {_num(acq['ratio_to_off'][name], 2)}"
            )
    lag = report.get("lag")
    if lag:
        lines.append("cdc lag, consumer in its own process, verification on")
        for path, e in lag.items():
            lines.append(
                f"  {path:<8} asked {e['target_rate']:.0f}/s, achieved"
                f" {e['achieved_ops_per_s']:.0f}/s, p50 {_num(e['lag_p50_ms'])} ms,"
                f" p99 {_num(e['lag_p99_ms'])} ms over {e['lag_count']} transactions,"
                f" verification {_verdict(e['verification_passed'])}"
            )
    soak = report.get("soak")
    if soak:
        lr, cr = soak["locust_rss_kb"], soak["consumer_rss_kb"]
        lines += [
            f"soak, {soak['seconds']} s at {soak['users']} users,"
            f" {soak['ops_per_s']:.0f} ops/s, verification"
            f" {_verdict(soak['verification_passed'])}",
            f"  over the first {soak['rate_window_s']:.0f} s: produced"
            f" {soak['produced_per_s']:.0f} tx/s, applied {soak['applied_per_s']:.0f}"
            " tx/s",
            f"  backlog bytes at {soak['reference_s']:.0f} s"
            f" {soak['backlog_reference_bytes']}, at {soak['end_s']:.0f} s"
            f" {soak['backlog_end_bytes']}, max {soak['backlog_max_bytes']}",
            f"  rss kB from {soak['reference_s']:.0f} s: locust {lr[0]} -> {lr[1]},"
            f" consumer {cr[0]} -> {cr[1]}",
        ]
    rows = report.get("targets") or []
    if rows:
        width = max(len(r["name"]) for r in rows)
        lines.append(f"  {'target':<{width}}  {'required':<9} {'measured':<22} result")
        for r in rows:
            result = {True: "met", False: "NOT MET", None: "-"}[r["met"]]
            lines.append(
                f"  {r['name']:<{width}}  {r['required']:<9} {r['measured']:<22}"
                f" {result}"
            )
    if report.get("error"):
        lines.append(f"stopped early: {report['error']}")
    return lines


def _verdict(passed: bool | None) -> str:
    return {True: "passed", False: "FAILED", None: "not run"}[passed]


def machine(postgresql: str) -> dict[str, Any]:
    """Describe where the bench ran."""
    mem_kb = 0
    try:
        meminfo = Path("/proc/meminfo").read_text()
        match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
        mem_kb = int(match.group(1)) if match else 0
    except OSError:
        pass
    pgbench = subprocess.run(
        [shutil.which("pgbench") or "pgbench", "--version"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "postgresql": postgresql,
        "pgbench": pgbench,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def run(bench: Bench, plan: Plan, report: dict[str, Any]) -> None:
    """Run every step, filling `report` as each ends."""
    report["throughput"] = tp = step_throughput(bench, plan)
    best_users = int(tp["best_harness"]["users"])
    pgbench_tps = float(tp["best_pgbench"]["tps"])
    report["batched"] = batched = step_batched(bench, plan, best_users, pgbench_tps)
    report["acquire_check"] = step_acquire_check(bench, plan, best_users)

    direct_runs = [
        HarnessRun(**r) for r in tp["harness_runs"] if r["users"] == best_users
    ]
    batched_best_users = int(batched["best"]["users"])
    batched_runs = [
        HarnessRun(**r) for r in batched["runs"] if r["users"] == batched_best_users
    ]
    pgbench_runs = [
        PgbenchRun(**r) for r in tp["pgbench_runs"] if r["clients"] == best_users
    ]
    report["cpu"] = step_cpu(bench, direct_runs, batched_runs, pgbench_runs)
    report["lag"] = step_lag(bench, plan, best_of(direct_runs), best_of(batched_runs))
    if plan.soak_s > 0:
        report["soak"] = step_soak(bench, plan, best_users)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, print the report and write it as JSON; return the exit code.

    Exit 0 when every step ran (targets met or not: the table says), 1 when a step
    could not run, 130 on Ctrl-C.
    """
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench", description=__doc__
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: few, short rounds"
    )
    parser.add_argument(
        "--soak-minutes", type=float, default=10.0, help="soak length (default 10)"
    )
    parser.add_argument("--skip-soak", action="store_true", help="no soak")
    parser.add_argument(
        "--logs", help="keep every run's log and summary here (default: removed)"
    )
    args = parser.parse_args(argv)
    if args.soak_minutes <= 0 and not args.skip_soak:
        parser.error("--soak-minutes must be more than 0; use --skip-soak for none")
    logs.configure("INFO")
    plan = plan_for(
        quick=args.quick, soak_minutes=args.soak_minutes, skip_soak=args.skip_soak
    )

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    # Started in the background by a shell, Python inherits SIGINT ignored; the
    # bench must still stop its children when one is sent.
    signal.signal(signal.SIGINT, signal.default_int_handler)

    logdir = Path(args.logs) if args.logs else Path(tempfile.mkdtemp(prefix="bench-"))
    logdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL),
        os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        logdir,
    )
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": "quick" if args.quick else "full",
        "plan": dataclasses.asdict(plan),
    }
    code = 0
    try:
        report["machine"] = machine(bench.create_database())
        logger.info(
            "bench on database %s, redis db %s, logs in %s", DATABASE, REDIS_DB, logdir
        )
        run(bench, plan, report)
    except CdcLoadError as exc:
        logger.error("bench stopped: %s", exc)
        report["error"] = str(exc)
        code = 1
    except KeyboardInterrupt:
        report["error"] = "interrupted"
        code = 130
    finally:
        bench.children.stop_all()
        bench.drop_slot()
    report.setdefault("machine", {})
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["load_average_end"] = round(os.getloadavg()[0], 2)
    report["targets"] = [dataclasses.asdict(t) for t in targets(report)]
    REPORT_PATH.parent.mkdir(parents=True, exist_ok=True)
    REPORT_PATH.write_text(json.dumps(report, indent=2) + "\n")
    if report["machine"]:
        _print(render(report), sys.stdout)
    print(f"report written to {REPORT_PATH.relative_to(ROOT)}", file=sys.stderr)
    if code == 0 and not args.logs:
        shutil.rmtree(logdir, ignore_errors=True)
    elif code != 0:
        print(f"logs of the runs kept in {logdir}", file=sys.stderr)
    return code


def _print(lines: Sequence[str], out: TextIO) -> None:
    for line in lines:
        print(line, file=out)
    out.flush()


if __name__ == "__main__":
    sys.exit(main())
