"""The pieces of a CDC pipeline the tests start: consumer, Locust, Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

from services.config import Profile
from tests.conftest import ROOT, make_profile, unique

BIN = Path(sys.executable).parent
LOCUST = str(BIN / "locust")
CDC_LOAD = str(BIN / "cdc-load")


class Stack:
    """The environment of one test's pipeline: servers, slot, processes."""

    def __init__(self, tmp_path: Path, db_url: str, redis_url: str) -> None:
        self.tmp = tmp_path
        self.db_url = db_url
        self.redis_url = redis_url
        self.slot = unique("cdc_load_t")
        self.publication = unique("cdc_load_p")
        self.consumers: list[subprocess.Popen[str]] = []
        self._logs: list[Any] = []

    def env(self, **extra: str) -> dict[str, str]:
        base = {
            k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "LOCUST_"))
        }
        return {
            **base,
            "DATABASE_URL": self.db_url,
            "REDIS_URL": self.redis_url,
            "CDC_CDC__SLOT_NAME": self.slot,
            "CDC_CDC__PUBLICATION_NAME": self.publication,
            # These tests are about what arrives, not how fast: speed is for
            # `make bench`, and a busy machine must not fail them.
            "CDC_THRESHOLDS__MAX_P99_MS": "30000",
            "CDC_THRESHOLDS__MAX_CDC_LAG_P99_MS": "30000",
            **extra,
        }

    def profile(self) -> Profile:
        return make_profile(
            self.db_url,
            self.redis_url,
            **{"cdc.slot_name": self.slot, "cdc.publication_name": self.publication},
        )

    def start_consumer(self, **extra: str) -> subprocess.Popen[str]:
        ready = self.tmp / f"ready-{len(self.consumers)}"
        log = open(self.tmp / f"consumer-{len(self.consumers)}.log", "w")  # noqa: SIM115
        self._logs.append(log)
        proc = subprocess.Popen(
            [CDC_LOAD, "consumer", "--ready-file", str(ready)],
            cwd=ROOT,
            env=self.env(**extra),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.consumers.append(proc)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert proc.poll() is None, self.log(len(self.consumers) - 1)
            assert time.monotonic() < deadline, "consumer did not start in 30 s"
            time.sleep(0.05)
        return proc

    def log(self, index: int = -1) -> str:
        n = index if index >= 0 else len(self.consumers) - 1
        return (self.tmp / f"consumer-{n}.log").read_text()

    def stop_consumer(self, proc: subprocess.Popen[str]) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=30)

    def locust(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                LOCUST,
                "-f",
                "locustfile.py",
                "--headless",
                "--only-summary",
                "--csv",
                str(self.tmp / "run"),
                "--html",
                str(self.tmp / "run.html"),
                "--cdc-summary",
                str(self.tmp / "summary.json"),
                "-t",
                "90s",
                *args,
            ],
            cwd=ROOT,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def web_ui(self, port: int, **extra: str) -> subprocess.Popen[str]:
        """Start Locust with its web UI on `port`, the test started at once."""
        return subprocess.Popen(
            [
                LOCUST,
                "-f",
                "locustfile.py",
                "--web-host",
                "127.0.0.1",
                "--web-port",
                str(port),
                "--autostart",
                "-u",
                "5",
            ],
            cwd=ROOT,
            env=self.env(**extra),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def summary(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.tmp / "summary.json").read_text())
        return data

    def close(self) -> None:
        for proc in self.consumers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self._logs:
            log.close()
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
                " WHERE slot_name = %s AND NOT active",
                (self.slot,),
            )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis(port: int, folder: Path) -> None:
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
            "--logfile",
            str(folder / "redis.log"),
        ],
        check=True,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return
        except redis.ConnectionError:
            time.sleep(0.05)
    raise AssertionError("private redis did not start")


def stop_redis(port: int) -> None:
    # Shutdown closes the connection it was sent on.
    with contextlib.suppress(redis.ConnectionError):
        redis.Redis(port=port).shutdown(nosave=True)
