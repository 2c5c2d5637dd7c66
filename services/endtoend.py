"""The end of a run: drain the consumer, then verify, then write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from services import cache, consumer, logs, setup, verify
from services.config import Profile
from services.errors import CdcLoadError

logger = logs.get("endtoend")

REPORT_PATH = verify.REPORT_PATH


def run_verification(
    profile: Profile, *, report_path: Path | None = REPORT_PATH
) -> verify.Report:
    """Verify projections and cache against the event store; write the report.

    Raise `ServiceUnavailable` if PostgreSQL does not answer; an unreachable Redis
    is a violation of the cache check, not an error.
    """
    client = cache.client(profile.redis.url, max_connections=2)
    try:
        with setup.connect(profile.database.url, "verify") as conn:
            report = verify.verify(conn, client, slot=profile.cdc.slot_name)
    finally:
        client.close()
    if report_path is not None:
        verify.write_json(report, report_path)
    return report


def drain_and_verify(
    profile: Profile, *, report_path: Path | None = REPORT_PATH
) -> dict[str, Any]:
    """Drain the consumer, verify, and return both results as JSON-ready data.

    A drain that times out is reported (`drain.error`) and verification still
    runs, so the report shows what did not arrive.
    """
    result: dict[str, Any] = {}
    try:
        result["drain"] = consumer.drain(profile)
    except (CdcLoadError, redis.RedisError) as exc:
        logger.error("drain failed: %s", exc)
        result["drain"] = {"error": str(exc)}
    report = run_verification(profile, report_path=report_path)
    logger.info(
        "verification %s in %.2f s",
        "passed" if report.passed else "failed",
        report.elapsed_s,
    )
    result["verification"] = verify.to_dict(report)
    result["passed"] = report.passed and "error" not in result["drain"]
    return result
