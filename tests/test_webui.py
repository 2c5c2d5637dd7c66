"""The CDC tab of the web UI, rendered by a real headless Chromium during a run.

Needs Debian's `chromium` package (.ci/run installs it). The tab is opened with
`/?tab=cdc`; Chromium runs the page's scripts, which poll `/stats/requests`, and
the test reads the rendered DOM for live numbers.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.pipeline import Stack, free_port

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("no chromium: install Debian's chromium package", pytrace=False)
    return found


def stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/stats/requests", timeout=2
    ) as r:
        data: dict[str, Any] = json.load(r)
    return data


@pytest.mark.slow
def test_cdc_tab_renders_live_numbers(stack: Stack, tmp_path: Path) -> None:
    browser = chromium()
    stack.start_consumer()
    port = free_port()
    proc = stack.web_ui(
        port, CDC_WORKLOAD__TARGET_OPS="100000", CDC_WORKLOAD__TARGET_RATE="300"
    )
    try:
        # Wait until the consumer's status and some propagation have arrived.
        deadline = time.monotonic() + 30
        rows: dict[str, str] = {}
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                extended = stats(port).get("extended_stats", [])
            except OSError:
                continue
            tab = next((t for t in extended if t["key"] == "cdc"), None)
            rows = {r["metric"]: r["value"] for r in (tab or {}).get("data", [])}
            if "backlog bytes" in rows and "over" in rows.get(
                "lag ms (Locust, live)", ""
            ):
                break
        assert "backlog bytes" in rows, rows

        page = f"http://127.0.0.1:{port}/?tab=cdc"
        dom = subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=6000",
                "--dump-dom",
                page,
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        html = dom.stdout
        assert dom.returncode == 0, dom.stderr[-2000:]
        # The tab is there, selected, and its table holds numbers from this run.
        assert ">CDC<" in html
        assert "consumer checkpoint" in html
        assert re.search(r"p50 \d+ / p95 \d+ / p99 \d+ over \d+ transactions", html)
        assert re.search(r"\d+/[0-9A-F]+", html)  # an LSN
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={tmp_path / 'chromium'}",
                "--virtual-time-budget=6000",
                "--window-size=1280,900",
                f"--screenshot={tmp_path / 'cdc-tab.png'}",
                page,
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )
        assert (tmp_path / "cdc-tab.png").stat().st_size > 10_000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert stack.stop_consumer(stack.consumers[-1]) == 0
