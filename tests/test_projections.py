"""Applying source transactions: one projection transaction with its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from services import projections
from services.errors import CdcLoadError
from services.projections import OrderViolation

SLOT = "cdc_load_unit"


@dataclass(frozen=True)
class Row:
    account_id: int
    version: int
    delta: int


@dataclass(frozen=True)
class Tx:
    xid: int
    commit_lsn: int
    end_lsn: int
    commit_ts: datetime
    rows: tuple[Row, ...]


def tx(n: int, *rows: tuple[int, int, int]) -> Tx:
    return Tx(
        1000 + n, 100 * n, 100 * n + 50, datetime.now(UTC), tuple(Row(*r) for r in rows)
    )


def state(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    return (
        conn.execute("SELECT * FROM account_projections ORDER BY 1").fetchall()[:],
        conn.execute(
            "SELECT commit_lsn::text, applied_transactions FROM cdc_checkpoint"
        ).fetchall(),
        conn.execute("SELECT count(*) FROM cdc_applied").fetchone(),
    )


@pytest.fixture
def started(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
    projections.start_checkpoint(conn, SLOT)
    return conn


def test_batch_applies_sums_versions_and_checkpoint(started: Any) -> None:
    applied = projections.apply(
        started,
        SLOT,
        [tx(1, (1, 1, 100), (2, 1, 50)), tx(2, (1, 2, -30), (2, 2, 30))],
        after_lsn=0,
    )
    assert applied.transactions == 2 and applied.events == 4
    assert sorted(applied.accounts) == [(1, 70, 2), (2, 80, 2)]
    assert applied.checkpoint is not None and applied.checkpoint.commit_lsn == 200
    assert applied.checkpoint.end_lsn == 250
    assert len(applied.lags_ms) == 2 and all(lag >= 0 for lag in applied.lags_ms)


def test_replay_up_to_the_checkpoint_changes_nothing(started: Any) -> None:
    batch = [tx(1, (1, 1, 100)), tx(2, (1, 2, 5))]
    first = projections.apply(started, SLOT, batch, after_lsn=0)
    before = state(started)
    assert first.checkpoint is not None
    again = projections.apply(
        started, SLOT, batch, after_lsn=first.checkpoint.commit_lsn
    )
    assert again.transactions == 0 and again.skipped == 2
    assert state(started) == before


def test_out_of_order_versions_write_nothing_not_even_the_checkpoint(
    started: Any,
) -> None:
    projections.apply(started, SLOT, [tx(1, (1, 1, 100))], after_lsn=0)
    before = state(started)
    with pytest.raises(
        OrderViolation, match="account 1: version 3 arrived, 2 expected"
    ):
        projections.apply(
            started, SLOT, [tx(2, (2, 1, 10)), tx(3, (1, 3, 5))], after_lsn=100
        )
    assert state(started) == before
    with pytest.raises(OrderViolation, match="version 4 after 2"):
        projections.apply(started, SLOT, [tx(4, (1, 2, 1), (1, 4, 1))], after_lsn=100)
    assert state(started) == before


def test_projections_and_checkpoint_commit_together(
    conn: psycopg.Connection[Any],
) -> None:
    # No checkpoint row: the checkpoint update fails, and the projections written
    # before it in the same transaction are rolled back with it.
    with pytest.raises(CdcLoadError, match="has no checkpoint row"):
        projections.apply(conn, SLOT, [tx(1, (1, 1, 100))], after_lsn=0)
    assert conn.execute("SELECT count(*) FROM account_projections").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM cdc_applied").fetchone() == (0,)
