"""Both slot readers and the slot helpers, against the real server.

Every test works in the database `cdc_helper_a` (created when missing) on the
server of DATABASE_URL, on a slot and publication of its own whose names start
with `cdc_load_ha_`; the slot is dropped when the test ends, so no WAL is kept
behind. The same delivery checks run against both readers.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import conninfo

from scripts import helper_db
from services.replication import (
    SlotError,
    SlotReader,
    SourceTransaction,
    SqlSlotReader,
    StreamSlotReader,
    drop_slot,
    ensure_publication,
    ensure_slot,
    format_lsn,
    parse_lsn,
    slot_state,
)

ROOT = Path(__file__).resolve().parent.parent
#: Published next to events, to make transactions without event rows.
OTHER_DDL = "CREATE TABLE IF NOT EXISTS cdc_ha_other (id bigint, note text)"
#: Not published: its writes move the WAL but send nothing.
UNPUBLISHED_DDL = "CREATE TABLE IF NOT EXISTS cdc_ha_unpublished (id bigint)"
#: How long a test waits for transactions it wrote, in seconds.
ARRIVAL_TIMEOUT_S = 10.0
#: How long a test listens to be sure nothing more comes, in seconds.
QUIET_S = 0.5

Kind = str
KINDS = ["sql", "stream"]


@pytest.fixture(scope="module")
def url() -> str:
    """URL of the helper database, with its tables in place."""
    target = helper_db.ensure()
    with psycopg.connect(target, autocommit=True) as conn:
        for ddl in (OTHER_DDL, UNPUBLISHED_DDL):
            conn.execute(ddl)
        # Without a key, a published table refuses updates unless identity is full.
        conn.execute("ALTER TABLE cdc_ha_other REPLICA IDENTITY FULL")
    return target


@pytest.fixture
def conn(url: str) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit connection to the helper database."""
    with psycopg.connect(url, autocommit=True, application_name="pytest") as c:
        yield c


@pytest.fixture
def slot(conn: psycopg.Connection[Any]) -> Iterator[str]:
    """A new slot, and a publication of the same name for events and cdc_ha_other.

    Both are dropped when the test ends, even if a reader still holds the slot.
    """
    name = f"cdc_load_ha_{uuid.uuid4().hex[:12]}"
    assert ensure_publication(conn, name)
    conn.execute(f"ALTER PUBLICATION {name} ADD TABLE cdc_ha_other")
    assert ensure_slot(conn, name)
    try:
        yield name
    finally:
        try:
            drop_slot(conn, name)
        except SlotError:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots"
                " WHERE slot_name = %s",
                (name,),
            )
            drop_slot(conn, name)
        conn.execute(f"DROP PUBLICATION IF EXISTS {name}")


def open_reader(kind: Kind, url: str, slot: str, **options: Any) -> SlotReader:
    """Open the reader of `kind` on `slot`, reading the publication of that name."""
    if kind == "sql":
        return SqlSlotReader(url, slot, slot, **options)
    return StreamSlotReader(url, slot, slot, **options)


@dataclass(frozen=True)
class Written:
    """What a test committed in one transaction, to compare with what arrives."""

    xid: int
    #: (position, account_id, version, event_type, delta, transaction_id)
    rows: tuple[tuple[Any, ...], ...]
    other_changes: int = 0


_next_account = iter(range(int(time.time() * 1000) % 10**9 * 100, 10**15))


def write(conn: psycopg.Connection[Any], events: int = 1, others: int = 0) -> Written:
    """Commit one transaction of `events` event rows and `others` other rows."""
    rows = []
    with conn.transaction():
        account = next(_next_account)
        for version in range(1, events + 1):
            row = conn.execute(
                "INSERT INTO events"
                " (account_id, version, event_type, delta, transaction_id)"
                " VALUES (%s, %s, 'Deposited', %s, %s)"
                " RETURNING position, account_id, version, event_type, delta,"
                " transaction_id::text",
                (account, version, version * 10, uuid.uuid4()),
            ).fetchone()
            assert row is not None
            rows.append(tuple(row))
        for i in range(others):
            conn.execute("INSERT INTO cdc_ha_other VALUES (%s, 'x')", (i,))
        xid = conn.execute("SELECT txid_current() % 4294967296").fetchone()
    assert xid is not None
    return Written(int(xid[0]), tuple(rows), others)


def collect(reader: SlotReader, count: int) -> list[SourceTransaction]:
    """Read until `count` transactions came, then listen a while for extra ones."""
    got: list[SourceTransaction] = []
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while len(got) < count and time.monotonic() < deadline:
        got.extend(reader.read(timeout_s=0.2))
    got.extend(reader.read(timeout_s=QUIET_S))
    return got


def as_written(transaction: SourceTransaction) -> Written:
    rows = tuple(
        (r.position, r.account_id, r.version, r.event_type, r.delta, r.transaction_id)
        for r in transaction.rows
    )
    return Written(transaction.xid, rows, transaction.other_changes)


def test_lsn_helpers_round_trip() -> None:
    assert parse_lsn(format_lsn(0x1_0000_00FF)) == 0x1_0000_00FF
    assert format_lsn(parse_lsn("0/16B3748")) == "0/16B3748"


@pytest.mark.parametrize("kind", KINDS)
def test_every_committed_transaction_arrives_once_in_commit_order(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    written = [
        write(conn, events=1),
        write(conn, events=3),
        write(conn, events=0, others=2),
        write(conn, events=2, others=1),
    ]
    # Begun first, committed last: it must arrive after the one that overtook it.
    with psycopg.connect(url, autocommit=True) as late:
        with late.transaction():
            late.execute("INSERT INTO cdc_ha_other VALUES (-1, 'late')")
            written.append(write(conn, events=1))
            xid = late.execute("SELECT txid_current() % 4294967296").fetchone()
        assert xid is not None
        written.append(Written(int(xid[0]), (), 1))
    written.append(write(conn, events=2))

    with open_reader(kind, url, slot) as reader:
        got = collect(reader, len(written))

    assert [as_written(t) for t in got] == written
    commits = [t.commit_lsn for t in got]
    assert commits == sorted(commits) and len(set(commits)) == len(commits)
    for transaction in got:
        assert transaction.commit_lsn < transaction.end_lsn
        assert transaction.commit_ts.tzinfo is UTC
        age = datetime.now(UTC) - transaction.commit_ts
        assert timedelta(0) <= age < timedelta(minutes=1)
        unix = datetime(1970, 1, 1, tzinfo=UTC)
        since = transaction.commit_ts - unix
        assert since == timedelta(microseconds=transaction.commit_time_us)
        assert not transaction.truncated_events


@pytest.mark.parametrize("kind", KINDS)
def test_confirmed_never_comes_again_and_the_rest_does(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    written = [write(conn, events=2) for _ in range(6)]

    with open_reader(kind, url, slot) as reader:
        first = collect(reader, 6)
        reader.confirm(first[2].end_lsn)
    assert [t.xid for t in first] == [w.xid for w in written]
    assert slot_state(conn, slot).confirmed_flush_lsn == first[2].end_lsn

    with open_reader(kind, url, slot) as reader:
        second = collect(reader, 3)
        reader.confirm(second[-1].end_lsn)
    assert [as_written(t) for t in second] == written[3:]
    assert second == first[3:]

    with open_reader(kind, url, slot) as reader:
        assert reader.read(timeout_s=QUIET_S) == []
    assert slot_state(conn, slot).confirmed_flush_lsn >= first[-1].end_lsn


@pytest.mark.parametrize("kind", KINDS)
def test_unconfirmed_transactions_come_again_after_reconnect(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    written = [write(conn, events=1) for _ in range(3)]

    with open_reader(kind, url, slot) as reader:
        first = collect(reader, 3)
    with open_reader(kind, url, slot) as reader:
        again = collect(reader, 3)

    assert [as_written(t) for t in first] == written
    assert again == first


@pytest.mark.parametrize("kind", KINDS)
def test_truncate_and_changes_on_other_tables_are_counted_not_typed(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    with conn.transaction():
        conn.execute("INSERT INTO cdc_ha_other VALUES (7, 'a')")
        conn.execute("UPDATE cdc_ha_other SET note = 'b' WHERE id = 7")
        conn.execute("DELETE FROM cdc_ha_other WHERE id = 7")
    conn.execute("TRUNCATE events")
    conn.execute("INSERT INTO cdc_ha_unpublished VALUES (1)")
    after = write(conn, events=1)

    with open_reader(kind, url, slot) as reader:
        got = collect(reader, 3)

    assert [(t.rows, t.other_changes, t.truncated_events) for t in got[:2]] == [
        ((), 3, False),
        ((), 1, True),
    ]
    assert [as_written(t) for t in got[2:]] == [after]


@pytest.mark.parametrize("kind", KINDS)
def test_a_slot_in_use_is_refused(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    with StreamSlotReader(url, slot, slot) as holder:
        holder.read(timeout_s=0.1)
        with (
            pytest.raises(SlotError, match="active"),
            open_reader(kind, url, slot) as other,
        ):
            other.read(timeout_s=0.1)


@pytest.mark.parametrize("kind", KINDS)
def test_a_reader_whose_server_session_ends_fails_for_good(
    kind: Kind, url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    name = f"cdc-load-cdc-doomed-{kind}"
    reader = open_reader(kind, url, slot, application_name=name)
    try:
        assert reader.read(timeout_s=0.1) == []
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s",
            (name,),
        )
        with pytest.raises(SlotError):
            deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
            while time.monotonic() < deadline:
                reader.read(timeout_s=0.2)
        with pytest.raises(SlotError):
            reader.read(timeout_s=0.1)
    finally:
        reader.close()


def test_sql_reader_reads_ahead_one_window_only(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    written = [write(conn, events=1) for _ in range(5)]
    got: list[SourceTransaction] = []

    # Begin, Relation, Insert, Commit fill a window of four on the first peek.
    with SqlSlotReader(url, slot, slot, upto_nchanges=4) as reader:
        first = reader.read(timeout_s=0.5)
        assert len(first) == 1
        assert reader.read(timeout_s=0.2) == []
        got.extend(first)
        while len(got) < 5:
            reader.confirm(got[-1].end_lsn)
            batch = reader.read(timeout_s=1.0)
            assert 1 <= len(batch) <= 2
            got.extend(batch)
        reader.confirm(got[-1].end_lsn)
        assert reader.read(timeout_s=0.2) == []

    assert [as_written(t) for t in got] == written


def test_stream_reader_returns_at_most_max_transactions(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    written = [write(conn, events=1) for _ in range(5)]
    got: list[SourceTransaction] = []

    with StreamSlotReader(url, slot, slot, max_transactions=2) as reader:
        while len(got) < 5:
            batch = reader.read(timeout_s=1.0)
            assert 1 <= len(batch) <= 2
            got.extend(batch)

    assert [as_written(t) for t in got] == written


def test_stream_reader_answers_keepalives_on_a_short_timeout(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    # At 1 s the server drops a client that does not answer within the second,
    # far sooner than the reader's own 10 s status interval.
    short = conninfo.make_conninfo(url, options="-c wal_sender_timeout=1000")

    with StreamSlotReader(short, slot, slot) as reader:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            assert reader.read(timeout_s=0.5) == []
        written = write(conn, events=1)
        got = collect(reader, 1)
        assert slot_state(conn, slot).active

    assert [as_written(t) for t in got] == [written]


def test_stream_reader_reports_confirmed_lsn_while_it_runs(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    write(conn, events=1)
    write(conn, events=1)

    with StreamSlotReader(url, slot, slot, feedback_interval_s=0.2) as reader:
        got = collect(reader, 2)
        reader.confirm(got[0].end_lsn)
        reader.read(timeout_s=0.5)
        assert slot_state(conn, slot).confirmed_flush_lsn == got[0].end_lsn


def test_stream_reader_lets_an_idle_slot_follow_the_wal(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    write(conn, events=1)

    with StreamSlotReader(url, slot, slot, feedback_interval_s=0.1) as reader:
        (transaction,) = collect(reader, 1)
        reader.confirm(transaction.end_lsn)
        conn.execute("INSERT INTO cdc_ha_unpublished VALUES (2)")
        # The server announces WAL it skipped in keepalives; with nothing
        # unconfirmed the reader reports that as flushed.
        deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
        state = slot_state(conn, slot)
        while state.confirmed_flush_lsn <= transaction.end_lsn:
            assert time.monotonic() < deadline, "slot did not follow the wal"
            assert reader.read(timeout_s=0.2) == []
            state = slot_state(conn, slot)


def test_stream_reader_stops_cleanly_with_data_in_flight(
    url: str,
    conn: psycopg.Connection[Any],
    slot: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="cdcload.cdc")
    for _ in range(50):
        write(conn, events=2)

    reader = StreamSlotReader(url, slot, slot, max_transactions=1)
    assert len(reader.read(timeout_s=1.0)) == 1
    start = time.monotonic()
    reader.close()
    reader.close()
    took = time.monotonic() - start

    assert took < 2.0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not slot_state(conn, slot).active
    with pytest.raises(SlotError, match="not streaming"):
        reader.read()


def test_slot_helpers_create_reuse_measure_and_drop(
    conn: psycopg.Connection[Any],
) -> None:
    name = f"cdc_load_ha_{uuid.uuid4().hex[:12]}"
    try:
        assert ensure_publication(conn, name) is True
        assert ensure_publication(conn, name, ["public.events"]) is False
        # A table the publication lacks is added to it, and only that one.
        assert ensure_publication(conn, name, ["events", "cdc_ha_other"]) is False
        published = conn.execute(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", (name,)
        ).fetchall()
        assert sorted(r[0] for r in published) == ["cdc_ha_other", "events"]
        with pytest.raises(SlotError, match="cannot ensure"):
            ensure_publication(conn, name, ["cdc_ha_no_such_table"])

        assert ensure_slot(conn, name) is True
        assert ensure_slot(conn, name) is False
        write(conn, events=1)
        state = slot_state(conn, name)
        assert not state.active
        assert state.restart_lsn <= state.confirmed_flush_lsn <= state.current_lsn
        assert state.backlog_bytes == state.current_lsn - state.confirmed_flush_lsn
        assert state.retained_bytes == state.current_lsn - state.restart_lsn
        assert state.backlog_bytes > 0

        assert drop_slot(conn, name) is True
        assert drop_slot(conn, name) is False
        with pytest.raises(SlotError, match="does not exist"):
            slot_state(conn, name)
    finally:
        drop_slot(conn, name)
        conn.execute(f"DROP PUBLICATION IF EXISTS {name}")


def test_drop_slot_refuses_a_slot_that_stays_in_use(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    with StreamSlotReader(url, slot, slot) as reader:
        reader.read(timeout_s=0.1)
        with pytest.raises(SlotError, match="still in use"):
            drop_slot(conn, slot, timeout_s=0.3)


def test_ensure_slot_refuses_a_slot_of_another_plugin(
    conn: psycopg.Connection[Any],
) -> None:
    name = f"cdc_load_ha_{uuid.uuid4().hex[:12]}"
    conn.execute(
        "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (name,)
    )
    try:
        with pytest.raises(SlotError, match="not a pgoutput slot"):
            ensure_slot(conn, name)
    finally:
        drop_slot(conn, name)


@pytest.mark.parametrize(
    "call",
    [
        lambda c: ensure_slot(c, "Bad-Name"),
        lambda c: ensure_publication(c, "1abc"),
        lambda c: drop_slot(c, "x" * 64),
        lambda c: slot_state(c, "a;b"),
    ],
    ids=["slot", "publication", "too-long", "semicolon"],
)
def test_names_that_would_need_quoting_are_refused(
    conn: psycopg.Connection[Any], call: Callable[[psycopg.Connection[Any]], Any]
) -> None:
    with pytest.raises(ValueError, match="name must be"):
        call(conn)


def test_readers_name_their_connections(
    url: str, conn: psycopg.Connection[Any], slot: str
) -> None:
    query = (
        "SELECT application_name FROM pg_stat_activity"
        " WHERE application_name LIKE 'cdc-load-cdc-%%' AND pid <> pg_backend_pid()"
    )
    with SqlSlotReader(url, slot, slot), StreamSlotReader(url, slot, slot) as stream:
        stream.read(timeout_s=0.1)
        names = {row[0] for row in conn.execute(query).fetchall()}
    assert {"cdc-load-cdc-sql-reader", "cdc-load-cdc-stream-reader"} <= names

    with SqlSlotReader(url, slot, slot, application_name="cdc-load-cdc-mine"):
        names = {row[0] for row in conn.execute(query).fetchall()}
    assert "cdc-load-cdc-mine" in names


_GEVENT_CHECK = """
from gevent import monkey

monkey.patch_all()

import sys
import gevent
import psycopg
from services.replication import SqlSlotReader, StreamSlotReader

url, slot = sys.argv[1], sys.argv[2]
ticks = 0


def tick():
    global ticks
    while True:
        gevent.sleep(0.01)
        ticks += 1


ticker = gevent.spawn(tick)
for reader_class in (SqlSlotReader, StreamSlotReader):
    with reader_class(url, slot, slot) as reader:
        before = ticks
        assert reader.read(timeout_s=0.5) == [], "nothing was written"
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("INSERT INTO cdc_ha_other VALUES (1, 'gevent')")
        got = []
        for _ in range(20):
            got.extend(reader.read(timeout_s=0.5))
            if got:
                break
        assert len(got) == 1 and got[0].other_changes == 1, got
        reader.confirm(got[0].end_lsn)
        # The ticker ran while the reader waited: the wait yielded to it.
        assert ticks - before >= 20, (reader_class.__name__, ticks - before)
ticker.kill()
print("ok")
"""


def test_both_readers_yield_to_other_greenlets_when_gevent_patched(
    url: str, slot: str
) -> None:
    # A child process, so that the check holds whether or not this one is patched.
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_GEVENT_CHECK), url, slot],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
