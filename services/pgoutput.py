"""Decode the pgoutput logical replication protocol into frozen records.

`decode` turns one pgoutput message (the payload of an XLogData message, or the
`data` column of `pg_logical_slot_peek_binary_changes`) into one of the records
below. It understands protocol version 1 and everything version 2 adds (streamed
transactions). Because a streamed change carries a transaction id only between
Stream Start and Stream Stop, a session that asked for streaming must use a
`Decoder`, which follows those markers; `decode` assumes no stream is open.

A message type this module does not know (such as the two-phase messages of
version 3) becomes an `Unknown` record, logged once per type, so a newer server
degrades into skipped messages rather than a crash. Bytes that do not parse raise
`DecodeError`.

Times: a commit time is stored as `commit_time_us`, microseconds since the Unix
epoch (exact, and cheap to subtract), and offered as `commit_ts`, an aware UTC
`datetime` built on access. The wire carries microseconds since 2000-01-01;
`PG_EPOCH_UNIX_US` is the difference.

LSNs are plain ints; `format_lsn` and `parse_lsn` convert to and from the `X/Y`
text form the server uses.
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final

from services import logs
from services.errors import CdcLoadError

__all__ = [
    "EVENT_COLUMNS",
    "PG_EPOCH_UNIX_US",
    "UNCHANGED_TOAST",
    "Begin",
    "Column",
    "Commit",
    "DecodeError",
    "Decoder",
    "Delete",
    "EventRow",
    "Insert",
    "Message",
    "Origin",
    "PgOutputMessage",
    "Relation",
    "StreamAbort",
    "StreamCommit",
    "StreamStart",
    "StreamStop",
    "Truncate",
    "Type",
    "Unchanged",
    "Unknown",
    "Update",
    "Value",
    "decode",
    "event_row",
    "format_lsn",
    "parse_lsn",
]

logger = logs.get("cdc")

#: Microseconds from the Unix epoch to the PostgreSQL epoch, 2000-01-01 00:00 UTC.
PG_EPOCH_UNIX_US: Final = 946_684_800_000_000
_UNIX_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

#: Columns of the event store, in the order `EventRow` declares them.
EVENT_COLUMNS: Final = (
    "position",
    "account_id",
    "version",
    "event_type",
    "delta",
    "transaction_id",
    "created_at",
)

_U8 = struct.Struct("!B")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_I32 = struct.Struct("!i")
_U64 = struct.Struct("!Q")
_BEGIN = struct.Struct("!QqI")
_COMMIT = struct.Struct("!BQQq")
_STREAM_COMMIT = struct.Struct("!IBQQq")
_STREAM_ABORT = struct.Struct("!II")
_STREAM_ABORT_V4 = struct.Struct("!IIQq")
_MESSAGE = struct.Struct("!BQ")
_TRUNCATE = struct.Struct("!IB")
_RELATION_COLUMN = struct.Struct("!Ii")

_TEXT = ord("t")
_NULL = ord("n")
_UNCHANGED = ord("u")
_BINARY = ord("b")
_NEW = ord("N")
_KEY = ord("K")
_OLD = ord("O")

_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


class DecodeError(CdcLoadError):
    """Bytes are not a well-formed pgoutput message, or a row breaks the contract."""


class Unchanged(enum.Enum):
    """Marker for a TOASTed value an Update or Delete did not send ('u')."""

    TOAST = "u"


#: The value of a column whose TOASTed content did not change and was not sent.
UNCHANGED_TOAST: Final = Unchanged.TOAST

#: A column value: text ('t'), raw bytes ('b'), None ('n') or `UNCHANGED_TOAST`.
Value = str | bytes | None | Unchanged


def format_lsn(lsn: int) -> str:
    """Return `lsn` in the server's `X/Y` hexadecimal form.

    Raises ValueError if `lsn` is negative or wider than 64 bits.
    """
    if not 0 <= lsn < 1 << 64:
        raise ValueError(f"lsn out of range: {lsn!r}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Return the int value of an LSN written as `X/Y`.

    Raises ValueError if `text` is not two hexadecimal groups of at most eight
    digits separated by a slash.
    """
    match = _LSN_TEXT.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not an lsn: {text!r}")
    return int(match[1], 16) << 32 | int(match[2], 16)


def _unix_datetime(us: int) -> datetime:
    # timedelta arithmetic is exact for microseconds, unlike a float timestamp.
    return _UNIX_EPOCH + timedelta(microseconds=us)


class _CommitTime:
    """The `commit_ts` of a record that stores its commit time in microseconds."""

    __slots__ = ()
    commit_time_us: int

    @property
    def commit_ts(self) -> datetime:
        """Return the commit time as an aware UTC datetime.

        Computed on access: building a datetime costs as much as decoding a
        whole message, and most consumers need only the integer.
        """
        return _unix_datetime(self.commit_time_us)


@dataclass(frozen=True, slots=True)
class Begin(_CommitTime):
    """Start of a transaction ('B')."""

    #: LSN of the transaction's commit record; equals `Commit.commit_lsn`.
    final_lsn: int
    #: Commit time in microseconds since the Unix epoch; `commit_ts` as datetime.
    commit_time_us: int
    xid: int


@dataclass(frozen=True, slots=True)
class Commit(_CommitTime):
    """End of a transaction ('C')."""

    #: Unused by the server so far; always 0.
    flags: int
    #: LSN of the commit record.
    commit_lsn: int
    #: LSN just past the commit record: the position to confirm once applied.
    end_lsn: int
    #: Commit time in microseconds since the Unix epoch; `commit_ts` as datetime.
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class Origin:
    """Replication origin of the transaction being sent ('O')."""

    #: LSN of the commit on the origin server.
    origin_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a `Relation`."""

    #: 1 when the column is part of the replica identity key.
    flags: int
    name: str
    type_oid: int
    #: Type modifier (atttypmod), -1 when there is none.
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Tell whether the column belongs to the replica identity."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """Description of a table, sent before its first change in a session ('R')."""

    oid: int
    #: Schema name; empty for pg_catalog.
    namespace: str
    name: str
    #: 'd' default (primary key), 'n' nothing, 'f' full, 'i' index.
    replica_identity: str
    columns: tuple[Column, ...]
    #: Transaction id; set only inside a streamed transaction (version 2).
    xid: int | None = None
    _event_positions: tuple[int, ...] | None = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        # Computed once per Relation so that typing each Insert is index lookups.
        index = {column.name: i for i, column in enumerate(self.columns)}
        positions = None
        if all(name in index for name in EVENT_COLUMNS):
            positions = tuple(index[name] for name in EVENT_COLUMNS)
        object.__setattr__(self, "_event_positions", positions)

    @property
    def column_names(self) -> tuple[str, ...]:
        """Return the column names in the order tuple values come in."""
        return tuple(column.name for column in self.columns)


@dataclass(frozen=True, slots=True)
class Type:
    """Description of a non-builtin data type used by a later Relation ('Y')."""

    oid: int
    namespace: str
    name: str
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Insert:
    """A new row ('I')."""

    relation_oid: int
    values: tuple[Value, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Update:
    """A changed row ('U').

    `old_kind` is 'K' when `old` holds the replica identity key (the key changed),
    'O' when it holds the whole old row (REPLICA IDENTITY FULL), and None when no
    old values were sent. Unchanged TOASTed columns of `values` are
    `UNCHANGED_TOAST`.
    """

    relation_oid: int
    old_kind: str | None
    old: tuple[Value, ...] | None
    values: tuple[Value, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """A removed row ('D'); `old_kind` is 'K' (key only) or 'O' (whole row)."""

    relation_oid: int
    old_kind: str
    old: tuple[Value, ...]
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class Truncate:
    """Tables emptied by one TRUNCATE ('T')."""

    relation_oids: tuple[int, ...]
    #: Bit 1: CASCADE; bit 2: RESTART IDENTITY.
    options: int
    xid: int | None = None

    @property
    def cascade(self) -> bool:
        """Tell whether the TRUNCATE was CASCADE."""
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        """Tell whether the TRUNCATE restarted identity sequences."""
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class Message:
    """A message from pg_logical_emit_message ('M'), sent only when asked for."""

    transactional: bool
    lsn: int
    prefix: str
    content: bytes
    xid: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStart:
    """Start of a chunk of a streamed, still running transaction ('S', v2)."""

    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """End of a chunk of a streamed transaction ('E', v2)."""


@dataclass(frozen=True, slots=True)
class StreamCommit(_CommitTime):
    """Commit of a streamed transaction ('c', v2)."""

    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    #: Commit time in microseconds since the Unix epoch; `commit_ts` as datetime.
    commit_time_us: int


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """Abort of a streamed (sub)transaction ('A', v2).

    `abort_lsn` and `abort_ts` are only sent by protocol version 4.
    """

    xid: int
    subxid: int
    abort_lsn: int | None = None
    abort_ts: datetime | None = None


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type this decoder does not know; skip it."""

    tag: str
    size: int


PgOutputMessage = (
    Begin
    | Commit
    | Origin
    | Relation
    | Type
    | Insert
    | Update
    | Delete
    | Truncate
    | Message
    | StreamStart
    | StreamStop
    | StreamCommit
    | StreamAbort
    | Unknown
)


@dataclass(frozen=True, slots=True)
class EventRow:
    """One row of the event store, typed."""

    position: int
    account_id: int
    version: int
    event_type: str
    delta: int
    transaction_id: str
    #: The server's text form of the timestamptz, in the decoding session's
    #: TimeZone and DateStyle.
    created_at: str


def _string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.index(0, pos)
    return data[pos:end].decode(), end + 1


def _tuple(data: bytes, pos: int) -> tuple[tuple[Value, ...], int]:
    # The hot loop of the decoder: names are bound to locals on purpose.
    count = data[pos] << 8 | data[pos + 1]
    pos += 2
    values: list[Value] = []
    append = values.append
    unpack = _U32.unpack_from
    for _ in range(count):
        kind = data[pos]
        if kind == _TEXT:
            start = pos + 5
            pos = start + unpack(data, pos + 1)[0]
            append(data[start:pos].decode())
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _UNCHANGED:
            append(UNCHANGED_TOAST)
            pos += 1
        elif kind == _BINARY:
            start = pos + 5
            pos = start + unpack(data, pos + 1)[0]
            append(data[start:pos])
        else:
            raise DecodeError(f"unknown tuple value kind {chr(kind)!r} at {pos}")
    # Slicing past the end does not raise, so a short value must be caught here.
    if pos > len(data):
        raise DecodeError("tuple data ends inside a value")
    return tuple(values), pos


def _expect_end(data: bytes, pos: int, what: str) -> None:
    if pos != len(data):
        raise DecodeError(f"{len(data) - pos} unexpected trailing bytes after {what}")


def _begin(data: bytes, pos: int, xid: int | None) -> Begin:
    final_lsn, ts, txid = _BEGIN.unpack_from(data, pos)
    return Begin(final_lsn, ts + PG_EPOCH_UNIX_US, txid)


def _commit(data: bytes, pos: int, xid: int | None) -> Commit:
    flags, commit_lsn, end_lsn, ts = _COMMIT.unpack_from(data, pos)
    return Commit(flags, commit_lsn, end_lsn, ts + PG_EPOCH_UNIX_US)


def _origin(data: bytes, pos: int, xid: int | None) -> Origin:
    (lsn,) = _U64.unpack_from(data, pos)
    name, _ = _string(data, pos + 8)
    return Origin(lsn, name)


def _relation(data: bytes, pos: int, xid: int | None) -> Relation:
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, pos = _string(data, pos)
    identity = chr(data[pos])
    (count,) = _U16.unpack_from(data, pos + 1)
    pos += 3
    columns = []
    for _ in range(count):
        flags = data[pos]
        column, pos = _string(data, pos + 1)
        type_oid, modifier = _RELATION_COLUMN.unpack_from(data, pos)
        pos += 8
        columns.append(Column(flags, column, type_oid, modifier))
    return Relation(oid, namespace, name, identity, tuple(columns), xid)


def _type(data: bytes, pos: int, xid: int | None) -> Type:
    (oid,) = _U32.unpack_from(data, pos)
    namespace, pos = _string(data, pos + 4)
    name, _ = _string(data, pos)
    return Type(oid, namespace, name, xid)


def _insert(data: bytes, pos: int, xid: int | None) -> Insert:
    (oid,) = _U32.unpack_from(data, pos)
    if data[pos + 4] != _NEW:
        raise DecodeError(f"insert without a new tuple marker: {data[pos + 4]!r}")
    values, end = _tuple(data, pos + 5)
    _expect_end(data, end, "insert")
    return Insert(oid, values, xid)


def _update(data: bytes, pos: int, xid: int | None) -> Update:
    (oid,) = _U32.unpack_from(data, pos)
    pos += 4
    marker = data[pos]
    old_kind = None
    old = None
    if marker in (_KEY, _OLD):
        old_kind = chr(marker)
        old, pos = _tuple(data, pos + 1)
        marker = data[pos]
    if marker != _NEW:
        raise DecodeError(f"update without a new tuple marker: {marker!r}")
    values, end = _tuple(data, pos + 1)
    _expect_end(data, end, "update")
    return Update(oid, old_kind, old, values, xid)


def _delete(data: bytes, pos: int, xid: int | None) -> Delete:
    (oid,) = _U32.unpack_from(data, pos)
    marker = data[pos + 4]
    if marker not in (_KEY, _OLD):
        raise DecodeError(f"delete without an old tuple marker: {marker!r}")
    old, end = _tuple(data, pos + 5)
    _expect_end(data, end, "delete")
    return Delete(oid, chr(marker), old, xid)


def _truncate(data: bytes, pos: int, xid: int | None) -> Truncate:
    count, options = _TRUNCATE.unpack_from(data, pos)
    oids = struct.unpack_from(f"!{count}I", data, pos + 5)
    return Truncate(oids, options, xid)


def _message(data: bytes, pos: int, xid: int | None) -> Message:
    flags, lsn = _MESSAGE.unpack_from(data, pos)
    prefix, pos = _string(data, pos + 9)
    (size,) = _U32.unpack_from(data, pos)
    content = data[pos + 4 : pos + 4 + size]
    if len(content) != size:
        raise DecodeError("message content is shorter than its length")
    return Message(bool(flags & 1), lsn, prefix, content, xid)


def _stream_start(data: bytes, pos: int, xid: int | None) -> StreamStart:
    (txid,) = _U32.unpack_from(data, pos)
    return StreamStart(txid, data[pos + 4] == 1)


def _stream_stop(data: bytes, pos: int, xid: int | None) -> StreamStop:
    return StreamStop()


def _stream_commit(data: bytes, pos: int, xid: int | None) -> StreamCommit:
    txid, flags, commit_lsn, end_lsn, ts = _STREAM_COMMIT.unpack_from(data, pos)
    return StreamCommit(txid, flags, commit_lsn, end_lsn, ts + PG_EPOCH_UNIX_US)


def _stream_abort(data: bytes, pos: int, xid: int | None) -> StreamAbort:
    if len(data) - pos >= _STREAM_ABORT_V4.size:
        txid, subxid, lsn, ts = _STREAM_ABORT_V4.unpack_from(data, pos)
        return StreamAbort(txid, subxid, lsn, _unix_datetime(ts + PG_EPOCH_UNIX_US))
    txid, subxid = _STREAM_ABORT.unpack_from(data, pos)
    return StreamAbort(txid, subxid)


_Parser = Callable[[bytes, int, int | None], PgOutputMessage]

_PARSERS: Final[dict[int, _Parser]] = {
    ord("B"): _begin,
    ord("C"): _commit,
    ord("O"): _origin,
    ord("R"): _relation,
    ord("Y"): _type,
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("S"): _stream_start,
    ord("E"): _stream_stop,
    ord("c"): _stream_commit,
    ord("A"): _stream_abort,
}

#: Types that carry a transaction id first when sent inside a stream chunk.
_STREAMED_TAGS: Final = frozenset(ord(tag) for tag in "RYIUDTM")

_unknown_seen: set[int] = set()


def _decode(buf: bytes | memoryview, in_stream: bool) -> PgOutputMessage:
    data = buf.tobytes() if isinstance(buf, memoryview) else buf
    if not data:
        raise DecodeError("empty pgoutput message")
    tag = data[0]
    parser = _PARSERS.get(tag)
    if parser is None:
        if tag not in _unknown_seen:
            # A set, not a counter: a newer server may send such a message per
            # transaction, and one line says all there is to say.
            _unknown_seen.add(tag)
            logger.warning(
                "skipping pgoutput message type %r (%s bytes); not logged again",
                chr(tag),
                len(data),
            )
        return Unknown(chr(tag), len(data))
    try:
        if in_stream and tag in _STREAMED_TAGS:
            (xid,) = _U32.unpack_from(data, 1)
            return parser(data, 5, xid)
        return parser(data, 1, None)
    except (struct.error, IndexError, ValueError) as ex:
        # UnicodeDecodeError is a ValueError; so is bytes.index finding no NUL.
        raise DecodeError(
            f"malformed pgoutput message {chr(tag)!r} ({len(data)} bytes): {ex}"
        ) from ex


def decode(buf: bytes | memoryview) -> PgOutputMessage:
    """Decode one pgoutput message sent outside a streamed transaction.

    This is all a protocol version 1 session needs. Raises DecodeError if the
    bytes are empty, truncated or inconsistent; returns `Unknown` (logged once per
    type) for a message type it does not know.
    """
    return _decode(buf, False)


class Decoder:
    """Decode the messages of one session in order, following stream chunks.

    Needed only when the session asked for `streaming`: inside a chunk, changes
    carry their transaction id first. Not thread-safe; one per session.
    """

    def __init__(self) -> None:
        self._in_stream = False

    @property
    def in_stream(self) -> bool:
        """Tell whether a Stream Start was seen without its Stream Stop."""
        return self._in_stream

    def decode(self, buf: bytes | memoryview) -> PgOutputMessage:
        """Decode the next message of the session.

        Raises DecodeError as `decode` does, and also when stream chunks nest or
        a Stream Stop comes without a Stream Start.
        """
        message = _decode(buf, self._in_stream)
        if isinstance(message, StreamStart):
            if self._in_stream:
                raise DecodeError("stream start inside an open stream chunk")
            self._in_stream = True
        elif isinstance(message, StreamStop):
            if not self._in_stream:
                raise DecodeError("stream stop without a stream start")
            self._in_stream = False
        return message


def _integer(value: Value, column: str) -> int:
    if not isinstance(value, str):
        raise DecodeError(f"events.{column} is not text: {value!r}")
    try:
        return int(value)
    except ValueError as ex:
        raise DecodeError(f"events.{column} is not an integer: {value!r}") from ex


def _text(value: Value, column: str) -> str:
    if not isinstance(value, str):
        raise DecodeError(f"events.{column} is not text: {value!r}")
    return value


def event_row(relation: Relation, insert: Insert) -> EventRow:
    """Type the values of an Insert on the event store using its Relation.

    Columns are found by name, so their order in the table does not matter and
    extra columns are ignored. Raises DecodeError if the Insert is not on
    `relation`, a contract column is missing from it, or a value is null, binary,
    unchanged or not an integer where the contract says integer.
    """
    if insert.relation_oid != relation.oid:
        raise DecodeError(
            f"insert on relation {insert.relation_oid} typed with relation "
            f"{relation.oid} ({relation.name})"
        )
    positions = relation._event_positions
    if positions is None:
        missing = sorted(set(EVENT_COLUMNS) - set(relation.column_names))
        raise DecodeError(f"relation {relation.name} lacks event columns {missing}")
    values = insert.values
    if len(values) != len(relation.columns):
        raise DecodeError(
            f"insert has {len(values)} values, relation {relation.name} has "
            f"{len(relation.columns)} columns"
        )
    position, account_id, version, event_type, delta, transaction_id, created = (
        values[i] for i in positions
    )
    return EventRow(
        _integer(position, "position"),
        _integer(account_id, "account_id"),
        _integer(version, "version"),
        _text(event_type, "event_type"),
        _integer(delta, "delta"),
        _text(transaction_id, "transaction_id"),
        _text(created, "created_at"),
    )
