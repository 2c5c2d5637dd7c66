"""Checks on the server before any load: logical decoding, slot, connections.

A profile whose pools, summed over every process, cannot fit beside the consumer,
the tools and the server's reserved connections is refused with that arithmetic,
unless the run asks for overcommit on purpose (to reproduce exhaustion).
"""

from __future__ import annotations

from dataclasses import dataclass

from services import budget, logs
from services.config import Profile
from services.errors import ConfigError
from services.pool import Conn

logger = logs.get("preflight")


class ProfileDoesNotFit(ConfigError):
    """The profile needs more connections than the server has."""


@dataclass(frozen=True)
class Finding:
    """One thing preflight looked at."""

    name: str
    ok: bool
    detail: str


def _setting(conn: Conn, name: str) -> str | None:
    row = conn.execute(
        "SELECT setting FROM pg_settings WHERE name = %s", (name,)
    ).fetchone()
    return None if row is None else str(row[0])


def inspect(
    conn: Conn, profile: Profile, *, workers: int
) -> tuple[list[Finding], budget.ConnectionPlan]:
    """Look at the server for this profile and number of workers."""
    findings: list[Finding] = []
    level = _setting(conn, "wal_level") or "unknown"
    findings.append(
        Finding(
            "wal_level",
            level == "logical",
            f"wal_level is {level}"
            + ("" if level == "logical" else "; logical decoding needs logical"),
        )
    )
    cdc = profile.cdc
    slot = conn.execute(
        "SELECT active, database = current_database() FROM pg_replication_slots"
        " WHERE slot_name = %s",
        (cdc.slot_name,),
    ).fetchone()
    slots_max = int(_setting(conn, "max_replication_slots") or 0)
    slots_used_row = conn.execute(
        "SELECT count(*) FROM pg_replication_slots"
    ).fetchone()
    slots_used = int(slots_used_row[0]) if slots_used_row else 0
    if slot is None:
        free = slots_max - slots_used
        findings.append(
            Finding(
                "slot",
                free > 0,
                f"slot {cdc.slot_name} does not exist yet; the consumer creates it"
                f" ({free} of {slots_max} slots free)",
            )
        )
    else:
        findings.append(
            Finding(
                "slot",
                bool(slot[1]),
                f"slot {cdc.slot_name} exists"
                + (", in use by a consumer" if slot[0] else ", no consumer attached")
                + ("" if slot[1] else ", but in another database"),
            )
        )
    publication = conn.execute(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (cdc.publication_name,)
    ).fetchone()
    findings.append(
        Finding(
            "publication",
            True,
            f"publication {cdc.publication_name} "
            + (
                "exists"
                if publication
                else "does not exist yet; the consumer creates it"
            ),
        )
    )

    max_connections = int(_setting(conn, "max_connections") or 0)
    reserved = int(_setting(conn, "superuser_reserved_connections") or 0)
    # PostgreSQL 16 adds reserved_connections; absent before, and then 0.
    reserved += int(_setting(conn, "reserved_connections") or 0)
    connections = budget.plan(
        profile, workers=workers, max_connections=max_connections, reserved=reserved
    )
    findings.append(Finding("connections", connections.fits, connections.describe()))
    return findings, connections


def check(
    conn: Conn, profile: Profile, *, workers: int, allow_overcommit: bool
) -> list[Finding]:
    """Run `inspect` and refuse what cannot work.

    Raise `ProfileDoesNotFit` with the arithmetic in one line when the connections
    do not fit (unless `allow_overcommit`), and `ConfigError` when logical decoding
    is unavailable. Return the findings otherwise.
    """
    findings, connections = inspect(conn, profile, workers=workers)
    for finding in findings:
        if finding.name == "wal_level" and not finding.ok:
            raise ConfigError(
                f"{finding.detail} (ALTER SYSTEM SET wal_level = logical, then restart)"
            )
        if finding.name == "slot" and not finding.ok:
            raise ConfigError(finding.detail)
    if not connections.fits:
        if not allow_overcommit:
            raise ProfileDoesNotFit(
                f"profile {profile.name} does not fit: {connections.describe()};"
                " lower the pools, or pass --allow-overcommit to run it anyway"
            )
        logger.warning("overcommit allowed: %s", connections.describe())
    return findings
