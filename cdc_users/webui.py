"""The CDC tabs of the Locust web UI.

Locust's UI shows extra tabs on its main page when `template_args` names them, and
fills their tables from `extended_stats` in the `/stats/requests` answer it polls.
Two tabs: `CDC` (the state now: lag, backlog, WAL retained, each worker's pool,
breaker and pauses, the verification verdict) and `CDC over time` (one row per
consumer status sample). Open a tab directly with `/?tab=cdc`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from flask import Response, request
from locust.env import Environment

from cdc_users import summary

TAB = "cdc"
HISTORY_TAB = "cdc-history"
#: Rows of the history tab: the latest samples, one per status interval.
HISTORY_ROWS = 60


def install(environment: Environment, state: Callable[[], dict[str, Any]]) -> None:
    """Add the tabs to the web UI; `state()` returns what they show."""
    web_ui = environment.web_ui
    if web_ui is None:
        return
    web_ui.template_args["extended_tabs"] = [
        {"title": "CDC", "key": TAB},
        {"title": "CDC over time", "key": HISTORY_TAB},
    ]
    web_ui.template_args["extended_tables"] = [
        {
            "key": TAB,
            "structure": [
                {"key": "metric", "title": "Metric"},
                {"key": "value", "title": "Value"},
            ],
        },
        {
            "key": HISTORY_TAB,
            "structure": [
                {"key": "time", "title": "Time"},
                {"key": "lag_p50_ms", "title": "Lag p50 ms"},
                {"key": "lag_p99_ms", "title": "Lag p99 ms"},
                {"key": "backlog_bytes", "title": "Backlog bytes"},
                {"key": "retained_bytes", "title": "WAL retained bytes"},
            ],
        },
    ]

    app = web_ui.app
    assert app is not None

    @app.after_request
    def add_cdc_stats(response: Response) -> Response:
        if request.path != "/stats/requests" or response.status_code != 200:
            return response
        body = response.get_json(silent=True)
        if not isinstance(body, dict):
            return response
        now = state()
        body["extended_stats"] = [
            {"key": TAB, "data": rows(environment, now)},
            {"key": HISTORY_TAB, "data": history_rows(now)},
        ]
        response.set_data(json.dumps(body))
        return response


def rows(environment: Environment, state: dict[str, Any]) -> list[dict[str, str]]:
    """The `CDC` tab: one metric per row."""
    out: list[dict[str, str]] = []

    def add(metric: str, value: object) -> None:
        out.append({"metric": metric, "value": str(value)})

    cdc = summary.merged(environment, summary.CDC_TYPE)
    if cdc.num_requests:
        add(
            "lag ms (Locust, live)",
            f"p50 {cdc.get_response_time_percentile(0.5):.0f}"
            f" / p95 {cdc.get_response_time_percentile(0.95):.0f}"
            f" / p99 {cdc.get_response_time_percentile(0.99):.0f}"
            f" over {cdc.num_requests} transactions, {cdc.num_failures} late",
        )
    else:
        add("lag ms (Locust, live)", "no transaction seen yet")
    status = state.get("status") or {}
    if status:
        add("consumer checkpoint", status.get("checkpoint", "?"))
        add("applied transactions", status.get("applied_transactions", "?"))
        add("backlog bytes", status.get("backlog_bytes", "?"))
        add("WAL retained bytes", status.get("retained_bytes", "?"))
        p50, p99 = status.get("lag_p50_ms", "?"), status.get("lag_p99_ms", "?")
        add("lag ms (consumer)", f"p50 {p50} / p99 {p99}")
        add("cache write failures", status.get("cache_failures", "0"))
        age = time.time() - float(status.get("updated_at", 0) or 0)
        add("consumer status age s", f"{age:.1f}")
    else:
        add("consumer", "no status yet: is `cdc-load consumer` running?")
    for name, c in sorted(state.get("processes", {}).items()):
        add(
            f"worker {name}",
            f"pool utilization peak {c['peak_utilization']:.2f},"
            f" breaker {'OPEN' if c.get('breaker_open') else 'closed'}"
            f" ({c['trips']} trips), paused"
            f" {c['breaker_paused_s'] + c['utilization_paused_s']:g} s",
        )
    add("peak connections of ours", state.get("peak_connections", 0))
    end = state.get("end")
    if end is None:
        add("verification", "runs when the test stops")
    else:
        verification = end.get("verification") or {}
        checks = verification.get("checks", [])
        bad = [c["name"] for c in checks if c["violations"]]
        verdict = "PASS" if end.get("passed") else "FAIL"
        add("verification", verdict + (f": {', '.join(bad)}" if bad else ""))
        drain = end.get("drain") or {}
        if "error" in drain:
            add("drain", drain["error"])
    return out


def history_rows(state: dict[str, Any]) -> list[dict[str, str]]:
    """The `CDC over time` tab: the newest samples first."""
    out = []
    for point in reversed(state.get("history", [])[-HISTORY_ROWS:]):
        out.append(
            {
                "time": time.strftime("%H:%M:%S", time.localtime(point["t"])),
                "lag_p50_ms": f"{point.get('lag_p50_ms', 0):.1f}",
                "lag_p99_ms": f"{point.get('lag_p99_ms', 0):.1f}",
                "backlog_bytes": f"{point.get('backlog_bytes', 0):.0f}",
                "retained_bytes": f"{point.get('retained_bytes', 0):.0f}",
            }
        )
    return out
