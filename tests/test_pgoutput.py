"""The pgoutput decoder, on bytes captured from a real server and on made-up ones.

The fixtures under tests/data/ are pgoutput messages captured from PostgreSQL 15,
one hex-encoded message a line. `test_live_capture_matches_fixtures` captures the
same scenarios again from the server and checks they decode to the same message
sequence; to rewrite the files from the server, run

    CDC_REGENERATE_PGOUTPUT=1 .venv/bin/pytest tests/test_pgoutput.py -k live

The live capture uses the database `cdc_helper_a` on the server of DATABASE_URL
(created when missing), and a slot, a publication and a replication origin whose
names start with `cdc_load_ha_`, all dropped once the messages are read.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from scripts import helper_db
from services.pgoutput import (
    EVENT_COLUMNS,
    PG_EPOCH_UNIX_US,
    UNCHANGED_TOAST,
    Begin,
    Commit,
    DecodeError,
    Decoder,
    Delete,
    Insert,
    Message,
    Origin,
    PgOutputMessage,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Type,
    Unknown,
    Update,
    decode,
    event_row,
    format_lsn,
    parse_lsn,
)

DATA = Path(__file__).resolve().parent / "data"
SLOT = "cdc_load_ha_fixture"
PUBLICATION = "cdc_load_ha_fixture"
ORIGIN = "cdc_load_ha_origin"
#: Rows the events scenario writes; its account is emptied first.
ACCOUNT = 101
EVENTS = [
    # (version, event_type, delta, transaction_id), first transaction then second.
    (1, "AccountOpened", 1_000_000, "00000000-0000-4000-8000-000000000001"),
    (2, "Deposited", 250, "00000000-0000-4000-8000-000000000002"),
    (3, "Withdrawn", -75, "00000000-0000-4000-8000-000000000002"),
    (4, "Deposited", 5, "00000000-0000-4000-8000-000000000003"),
]
BODY = "x" * 4000
#: Inserts of the stream scenario kept per chunk; the rest repeat the same shape.
STREAM_INSERTS_KEPT = 3


@pytest.fixture(scope="module")
def capture_url() -> str:
    """URL of the helper database, with the events table in place."""
    return helper_db.ensure()


def _load(name: str) -> list[bytes]:
    lines = (DATA / f"{name}.hex").read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line and not line.startswith("#")]


def _save(name: str, messages: list[bytes], server_version: str) -> None:
    header = [
        f"# pgoutput messages of scenario {name!r}, one hex-encoded message a line,",
        f"# captured from {server_version}.",
        "# Regenerate: CDC_REGENERATE_PGOUTPUT=1 pytest tests/test_pgoutput.py -k live",
    ]
    DATA.mkdir(exist_ok=True)
    body = [message.hex() for message in messages]
    (DATA / f"{name}.hex").write_text("\n".join(header + body) + "\n")


def _events_scenario(conn: psycopg.Connection[Any]) -> None:
    insert = (
        "INSERT INTO events (account_id, version, event_type, delta, transaction_id)"
        " VALUES (%s, %s, %s, %s, %s)"
    )
    with conn.transaction():
        for event in EVENTS[:3]:
            conn.execute(insert, (ACCOUNT, *event))
    conn.execute(insert, (ACCOUNT, *EVENTS[3]))


def _scratch_scenario(conn: psycopg.Connection[Any]) -> None:
    # One transaction per kind of change, so the fixture reads as a list of cases.
    conn.execute(
        "INSERT INTO cdc_ha_scratch"
        " VALUES (1, NULL, 'happy', %s), (2, 'two', NULL, NULL)",
        (BODY,),
    )
    conn.execute("UPDATE cdc_ha_scratch SET note = 'noted' WHERE id = 1")
    conn.execute("UPDATE cdc_ha_scratch SET id = 3 WHERE id = 2")
    conn.execute("ALTER TABLE cdc_ha_scratch REPLICA IDENTITY FULL")
    conn.execute("DELETE FROM cdc_ha_scratch WHERE id = 3")
    conn.execute("TRUNCATE cdc_ha_scratch")
    conn.execute("SELECT pg_replication_origin_session_setup(%s)", (ORIGIN,))
    try:
        conn.execute("INSERT INTO cdc_ha_scratch VALUES (4, 'from origin', 'calm', '')")
    finally:
        conn.execute("SELECT pg_replication_origin_session_reset()")
    conn.execute("SELECT pg_logical_emit_message(true, 'cdc_load_ha', 'inside')")
    conn.execute("SELECT pg_logical_emit_message(false, 'cdc_load_ha', 'outside')")
    # PostgreSQL 15 does not flush WAL for a non-transactional message, and a peek
    # reads only flushed WAL: a commit after it flushes it.
    conn.execute("INSERT INTO cdc_ha_scratch VALUES (7, NULL, NULL, NULL)")


def _binary_scenario(conn: psycopg.Connection[Any]) -> None:
    conn.execute("INSERT INTO cdc_ha_scratch VALUES (6, 'bin', 'calm', 'short')")


def _stream_scenario(conn: psycopg.Connection[Any]) -> None:
    conn.execute(
        "INSERT INTO cdc_ha_scratch"
        " SELECT g, repeat('s', 100), 'calm', NULL FROM generate_series(10, 3009) g"
    )


def _trim_stream(messages: list[bytes]) -> list[bytes]:
    # A streamed transaction is thousands of identical inserts; a few per chunk
    # keep every kind of message and the file small.
    kept = []
    inserts = 0
    for message in messages:
        if message[:1] == b"S":
            inserts = 0
        if message[:1] == b"I":
            inserts += 1
            if inserts > STREAM_INSERTS_KEPT:
                continue
        kept.append(message)
    return kept


Scenario = Callable[[psycopg.Connection[Any]], None]
SCENARIOS: dict[str, tuple[Scenario, str]] = {
    "pgoutput_v1_events": (_events_scenario, "'proto_version', '1'"),
    "pgoutput_v1_scratch": (
        _scratch_scenario,
        "'proto_version', '1', 'messages', 'true'",
    ),
    "pgoutput_v1_binary": (_binary_scenario, "'proto_version', '1', 'binary', 'true'"),
    "pgoutput_v2_stream": (
        _stream_scenario,
        "'proto_version', '2', 'streaming', 'on'",
    ),
}


def capture(url: str, name: str) -> list[bytes]:
    """Run scenario `name` on a fresh slot and return the messages it produced.

    The slot is dropped before returning, whatever happens.
    """
    scenario, options = SCENARIOS[name]
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(helper_db.EVENTS_DDL)
        conn.execute("DROP TABLE IF EXISTS cdc_ha_scratch")
        conn.execute("DROP TYPE IF EXISTS cdc_ha_mood")
        conn.execute("CREATE TYPE cdc_ha_mood AS ENUM ('calm', 'happy')")
        conn.execute(
            "CREATE TABLE cdc_ha_scratch"
            " (id int PRIMARY KEY, note text, mood cdc_ha_mood, body text)"
        )
        # Stored out of line uncompressed, so an update can leave it unchanged.
        conn.execute(
            "ALTER TABLE cdc_ha_scratch ALTER COLUMN body SET STORAGE EXTERNAL"
        )
        conn.execute("DELETE FROM events WHERE account_id = %s", (ACCOUNT,))
        conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
        conn.execute(
            f"CREATE PUBLICATION {PUBLICATION} FOR TABLE events, cdc_ha_scratch"
        )
        if (
            conn.execute(
                "SELECT 1 FROM pg_replication_origin WHERE roname = %s", (ORIGIN,)
            ).fetchone()
            is None
        ):
            conn.execute("SELECT pg_replication_origin_create(%s)", (ORIGIN,))
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE slot_name = %s",
            (SLOT,),
        )
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,)
        )
        try:
            scenario(conn)
            # Streaming starts once a transaction's changes pass this much memory.
            conn.execute("SET logical_decoding_work_mem = '64kB'")
            rows = conn.execute(
                "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                f"{options}, 'publication_names', %s)",
                (SLOT, PUBLICATION),
                binary=True,
            ).fetchall()
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
            conn.execute(f"DROP PUBLICATION {PUBLICATION}")
            # Origins are shared by the whole server: leave none behind.
            conn.execute("SELECT pg_replication_origin_drop(%s)", (ORIGIN,))
    messages = [bytes(row[0]) for row in rows]
    return _trim_stream(messages) if name == "pgoutput_v2_stream" else messages


def _kinds(messages: list[PgOutputMessage]) -> list[str]:
    return [type(message).__name__ for message in messages]


def _decode_session(messages: list[bytes]) -> list[PgOutputMessage]:
    decoder = Decoder()
    return [decoder.decode(message) for message in messages]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_live_capture_matches_fixtures(capture_url: str, name: str) -> None:
    live = capture(capture_url, name)
    if os.environ.get("CDC_REGENERATE_PGOUTPUT") == "1":
        with psycopg.connect(capture_url) as conn:
            version = conn.execute("SELECT version()").fetchone()
        assert version is not None
        _save(name, live, str(version[0]).split(",")[0])

    assert _kinds(_decode_session(live)) == _kinds(_decode_session(_load(name)))


def _check_commit_time(commit_ts: datetime, commit_time_us: int) -> None:
    assert commit_ts.tzinfo is UTC
    unix = datetime(1970, 1, 1, tzinfo=UTC)
    assert commit_ts == unix + timedelta(microseconds=commit_time_us)
    assert datetime(2020, 1, 1, tzinfo=UTC) < commit_ts < datetime.now(UTC)


def test_events_fixture_decodes_to_typed_rows() -> None:
    messages = [decode(message) for message in _load("pgoutput_v1_events")]

    assert _kinds(messages) == [
        "Begin",
        "Relation",
        "Insert",
        "Insert",
        "Insert",
        "Commit",
        "Begin",
        "Insert",
        "Commit",
    ]
    relation = messages[1]
    assert isinstance(relation, Relation)
    assert (relation.namespace, relation.name) == ("public", "events")
    assert relation.column_names == (
        "position",
        "account_id",
        "version",
        "event_type",
        "delta",
        "transaction_id",
        "created_at",
    )
    assert set(relation.column_names) == set(EVENT_COLUMNS)
    assert relation.replica_identity == "d"
    assert [column.is_key for column in relation.columns] == [True] + [False] * 6
    assert relation.columns[0].type_oid == 20  # int8
    assert relation.columns[5].type_oid == 2950  # uuid

    inserts = [m for m in messages if isinstance(m, Insert)]
    rows = [event_row(relation, insert) for insert in inserts]
    assert [(r.version, r.event_type, r.delta, r.transaction_id) for r in rows] == [
        (v, t, d, str(x)) for v, t, d, x in EVENTS
    ]
    assert {row.account_id for row in rows} == {ACCOUNT}
    positions = [row.position for row in rows]
    assert positions == sorted(positions) and len(set(positions)) == 4
    assert rows[0].created_at == rows[2].created_at != rows[3].created_at

    for begin, commit in ((messages[0], messages[5]), (messages[6], messages[8])):
        assert isinstance(begin, Begin) and isinstance(commit, Commit)
        assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
        assert begin.commit_ts == commit.commit_ts
        assert commit.flags == 0
        _check_commit_time(commit.commit_ts, commit.commit_time_us)
    first, second = messages[5], messages[8]
    assert isinstance(first, Commit) and isinstance(second, Commit)
    assert first.end_lsn <= second.commit_lsn


def test_scratch_fixture_covers_every_change_kind() -> None:
    messages = [decode(message) for message in _load("pgoutput_v1_scratch")]

    assert _kinds(messages) == [
        *("Begin", "Type", "Relation", "Insert", "Insert", "Commit"),
        *("Begin", "Update", "Commit"),
        *("Begin", "Update", "Commit"),
        *("Begin", "Type", "Relation", "Delete", "Commit"),
        *("Begin", "Type", "Relation", "Truncate", "Commit"),
        *("Begin", "Origin", "Type", "Relation", "Insert", "Commit"),
        *("Begin", "Message", "Commit"),
        "Message",
        *("Begin", "Insert", "Commit"),
    ]
    kind, relation = messages[1], messages[2]
    assert isinstance(kind, Type) and isinstance(relation, Relation)
    assert (kind.namespace, kind.name) == ("public", "cdc_ha_mood")
    assert relation.columns[2].type_oid == kind.oid

    # Nulls, an enum value and a TOASTed text, then a row of nulls.
    assert messages[3] == Insert(relation.oid, ("1", None, "happy", BODY))
    assert messages[4] == Insert(relation.oid, ("2", "two", None, None))

    # The TOASTed body did not change, so it was not sent.
    assert messages[7] == Update(
        relation.oid, None, None, ("1", "noted", "happy", UNCHANGED_TOAST)
    )
    # A key change sends the old key, other old columns as nulls.
    assert messages[10] == Update(
        relation.oid, "K", ("2", None, None, None), ("3", "two", None, None)
    )

    full = messages[14]
    assert isinstance(full, Relation) and full.replica_identity == "f"
    assert all(column.is_key for column in full.columns)
    assert messages[15] == Delete(full.oid, "O", ("3", "two", None, None))

    truncate = messages[20]
    assert isinstance(truncate, Truncate)
    assert truncate.relation_oids == (relation.oid,)
    assert not truncate.cascade and not truncate.restart_identity

    origin = messages[23]
    assert isinstance(origin, Origin) and origin.name == ORIGIN
    assert messages[26] == Insert(relation.oid, ("4", "from origin", "calm", ""))

    inside, outside = messages[29], messages[31]
    assert isinstance(inside, Message) and isinstance(outside, Message)
    assert (inside.transactional, inside.prefix, inside.content) == (
        True,
        "cdc_load_ha",
        b"inside",
    )
    assert (outside.transactional, outside.content) == (False, b"outside")
    assert inside.lsn < outside.lsn


def test_binary_fixture_keeps_raw_bytes() -> None:
    messages = [decode(message) for message in _load("pgoutput_v1_binary")]

    assert _kinds(messages) == ["Begin", "Type", "Relation", "Insert", "Commit"]
    insert = messages[3]
    assert isinstance(insert, Insert)
    assert insert.values[0] == struct.pack("!i", 6)
    assert insert.values[1] == b"bin"
    assert insert.values[3] == b"short"


def test_stream_fixture_needs_a_decoder_that_follows_chunks() -> None:
    raw = _load("pgoutput_v2_stream")
    decoder = Decoder()
    messages = []
    for data in raw:
        messages.append(decoder.decode(data))
        assert decoder.in_stream == isinstance(
            messages[-1], StreamStart | Relation | Type | Insert
        )

    starts = [m for m in messages if isinstance(m, StreamStart)]
    assert len(starts) >= 2
    assert starts[0].first_segment and not any(s.first_segment for s in starts[1:])
    xid = starts[0].xid
    assert all(s.xid == xid for s in starts)
    assert len(starts) == sum(isinstance(m, StreamStop) for m in messages)
    inserts = [m for m in messages if isinstance(m, Insert)]
    assert inserts and all(m.xid == xid for m in inserts)
    assert inserts[0].values == ("10", "s" * 100, "calm", None)
    commit = messages[-1]
    assert isinstance(commit, StreamCommit) and commit.xid == xid
    assert commit.commit_lsn < commit.end_lsn
    _check_commit_time(commit.commit_ts, commit.commit_time_us)


def test_stateless_decode_refuses_a_streamed_insert() -> None:
    streamed = next(m for m in _load("pgoutput_v2_stream") if m[:1] == b"I")

    # The xid prefix shifts every field, which the tuple markers catch.
    with pytest.raises(DecodeError):
        decode(streamed)


def test_unknown_message_type_is_skipped_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cdcload.cdc")

    first = decode(b"\x7fsomething")
    second = decode(memoryview(b"\x7fother"))

    assert first == Unknown("\x7f", 10)
    assert second == Unknown("\x7f", 6)
    assert len([r for r in caplog.records if "skipping pgoutput" in r.message]) == 1


def test_two_phase_messages_of_later_versions_are_unknown() -> None:
    # 'b' begin prepare, 'P' prepare, 'K' commit prepared (protocol version 3).
    for tag in b"bPK":
        message = decode(bytes([tag]) + bytes(30))
        assert isinstance(message, Unknown) and message.tag == chr(tag)


def test_stream_abort_with_and_without_version_4_fields() -> None:
    assert decode(b"A" + struct.pack("!II", 7, 8)) == StreamAbort(7, 8)
    v4 = decode(b"A" + struct.pack("!IIQq", 7, 8, 0x1_0000_0010, 0))
    assert v4 == StreamAbort(7, 8, 0x1_0000_0010, datetime(2000, 1, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"B" + bytes(10),
        b"C" + bytes(5),
        b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x09abc",
        b"I\x00\x00\x00\x01N\x00\x01x",
        b"I\x00\x00\x00\x01X\x00\x00",
        b"I\x00\x00\x00\x01N\x00\x00trailing",
        b"R\x00\x00\x00\x01public",
        b"I\x00\x00\x00\x01N\x00\x01t\x00\x00\x00\x02\xff\xfe",
        b"D\x00\x00\x00\x01N\x00\x00",
    ],
    ids=[
        "empty",
        "short-begin",
        "short-commit",
        "value-past-end",
        "unknown-value-kind",
        "no-new-marker",
        "trailing-bytes",
        "unterminated-string",
        "invalid-utf8",
        "delete-without-old",
    ],
)
def test_malformed_messages_raise_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_decoder_refuses_unbalanced_stream_markers() -> None:
    decoder = Decoder()
    with pytest.raises(DecodeError):
        decoder.decode(b"E")
    decoder.decode(b"S" + struct.pack("!IB", 9, 1))
    with pytest.raises(DecodeError):
        decoder.decode(b"S" + struct.pack("!IB", 9, 0))


def _events_relation() -> Relation:
    message = decode(_load("pgoutput_v1_events")[1])
    assert isinstance(message, Relation)
    return message


def test_event_row_refuses_rows_that_break_the_contract() -> None:
    relation = _events_relation()
    good = ("1", "2", "3", "Deposited", "4", "u", "now")
    assert event_row(relation, Insert(relation.oid, good)).delta == 4

    with pytest.raises(DecodeError, match="position"):
        event_row(relation, Insert(relation.oid, (None, *good[1:])))
    with pytest.raises(DecodeError, match="delta"):
        event_row(relation, Insert(relation.oid, (*good[:4], "4.5", *good[5:])))
    with pytest.raises(DecodeError, match="event_type"):
        event_row(relation, Insert(relation.oid, (*good[:3], b"x", *good[4:])))
    with pytest.raises(DecodeError, match="values"):
        event_row(relation, Insert(relation.oid, good[:6]))
    with pytest.raises(DecodeError, match="relation"):
        event_row(relation, Insert(relation.oid + 1, good))

    other = Relation(relation.oid, "public", "other", "d", relation.columns[:3])
    with pytest.raises(DecodeError, match="lacks event columns"):
        event_row(other, Insert(relation.oid, good[:3]))


def test_event_row_finds_columns_by_name_in_any_order() -> None:
    relation = _events_relation()
    shuffled = Relation(relation.oid, "s", "events", "d", relation.columns[::-1])
    values = ("now", "u", "4", "Deposited", "3", "2", "1")

    row = event_row(shuffled, Insert(relation.oid, values))

    assert (row.position, row.account_id, row.version, row.delta) == (1, 2, 3, 4)


def test_lsn_text_round_trip() -> None:
    assert format_lsn(0) == "0/0"
    assert format_lsn(0x16_B374D848) == "16/B374D848"
    assert parse_lsn("16/B374D848") == 0x16_B374D848
    assert parse_lsn("ffffffff/ffffffff") == (1 << 64) - 1
    for bad in ("", "16", "16/", "x/1", "1/123456789", "-1/0"):
        with pytest.raises(ValueError):
            parse_lsn(bad)
    with pytest.raises(ValueError):
        format_lsn(-1)
    pg_epoch = datetime(2000, 1, 1, tzinfo=UTC)
    assert int(pg_epoch.timestamp()) * 10**6 == PG_EPOCH_UNIX_US


def _rate(messages: list[bytes], rounds: int, relation: Relation | None) -> float:
    # CPU time, not wall time: on a shared machine, waiting for a core is not
    # the decoder's cost.
    start = time.process_time()
    for _ in range(rounds):
        for data in messages:
            message = decode(data)
            if relation is not None:
                assert isinstance(message, Insert)
                event_row(relation, message)
    return rounds * len(messages) / (time.process_time() - start)


def test_decoding_stays_well_above_100k_messages_a_second() -> None:
    # What a session sends for each transaction after its first: Begin, the
    # inserts, Commit. A Relation comes once a session, so it is left out.
    messages = [m for m in _load("pgoutput_v1_events") if m[:1] != b"R"]
    inserts = [m for m in messages if m[:1] == b"I"]
    relation = _events_relation()

    # Best of three, against the noise that CPU time still has; on the 2-core
    # development machine this decodes about 250,000 messages a second.
    rate = max(_rate(messages, 3_000, None) for _ in range(3))
    typed = max(_rate(inserts, 3_000, relation) for _ in range(3))

    assert rate > 100_000, f"{rate:,.0f} messages/s"
    # Typing costs about as much as decoding; the consumer's apply costs more.
    assert typed > 30_000, f"{typed:,.0f} typed inserts/s"


def _all_messages() -> Iterator[bytes]:
    for name in SCENARIOS:
        yield from _load(name)


def test_every_fixture_message_decodes_without_error() -> None:
    decoder = Decoder()
    kinds = {type(decoder.decode(message)) for message in _all_messages()}

    assert {Begin, Commit, Relation, Type, Insert, Update, Delete, Truncate} <= kinds
    assert {Origin, Message, StreamStart, StreamStop, StreamCommit} <= kinds
