"""Read a logical replication slot as source transactions, in two ways.

Both readers implement `SlotReader`: `read()` returns the next committed source
transactions, in commit order, each as a `SourceTransaction` with its typed
`events` rows; `confirm(lsn)` records that the caller has durably applied
everything up to `lsn`; `close()` hands that position to the server and releases
the slot.

- `SqlSlotReader` polls `pg_logical_slot_peek_binary_changes` on an ordinary
  connection and moves the slot with `pg_replication_slot_advance`.
- `StreamSlotReader` opens a walsender connection (`replication=database`), runs
  `START_REPLICATION` and exchanges CopyData messages through libpq directly,
  because psycopg has no replication API.

Delivery is at least once. Confirm a transaction's `end_lsn` (the LSN just past
its commit record): the server then never sends that transaction again, while
everything after the confirmed LSN comes again after a reconnect. A transaction
whose changes touch only other published tables is still delivered, with no rows,
so the caller can confirm past it; a transaction on tables outside the
publication is never sent at all (PostgreSQL 15 skips empty transactions; an
older server sends them, and they are delivered with no rows too).

Which to use: `StreamSlotReader`. Measured with scripts/measure_capture.py at
1,500 small transactions a second, its median lag was 1-2.5 ms against 27-33 ms
for `SqlSlotReader`, whose polls also kept half a server core busy re-decoding.

Threads: `read` and `close` must be called from one thread; `confirm` may be
called from any. Waiting is done with `selectors` and psycopg's own wait
functions, so both readers cooperate with gevent once it has patched the process,
and work unpatched as well.

The helpers `ensure_publication`, `ensure_slot`, `drop_slot` and `slot_state`
take an ordinary psycopg connection; names of slots and publications are limited
to lowercase letters, digits and underscores, so they never need quoting.
"""

from __future__ import annotations

import abc
import re
import selectors
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import psycopg
from psycopg import errors as pg_errors
from psycopg import pq, sql

from services import logs
from services.errors import CdcLoadError
from services.pgoutput import (
    PG_EPOCH_UNIX_US,
    Begin,
    Commit,
    Delete,
    EventRow,
    Insert,
    Relation,
    StreamAbort,
    StreamCommit,
    StreamStart,
    StreamStop,
    Truncate,
    Update,
    decode,
    event_row,
    format_lsn,
    parse_lsn,
)

__all__ = [
    "SlotError",
    "SlotReader",
    "SlotState",
    "SourceTransaction",
    "SqlSlotReader",
    "StreamSlotReader",
    "drop_slot",
    "ensure_publication",
    "ensure_slot",
    "format_lsn",
    "parse_lsn",
    "slot_state",
]

logger = logs.get("cdc")

#: Table whose inserts become typed rows.
EVENTS_TABLE = "events"
#: pgoutput protocol version both readers ask for.
PROTO_VERSION = 1
#: Default application_name of the SQL reader's connection.
SQL_APPLICATION_NAME = "cdc-load-cdc-sql-reader"
#: Default application_name of the streaming reader's connection.
STREAM_APPLICATION_NAME = "cdc-load-cdc-stream-reader"
#: Longest a `read()` call waits for a first transaction by default, in seconds.
READ_TIMEOUT_S = 1.0
#: Seconds a connection attempt may take.
CONNECT_TIMEOUT_S = 10.0
#: pgoutput messages one peek asks for. The server stops only at a commit, so a
#: peek returns whole transactions and may exceed this by one transaction.
UPTO_NCHANGES = 2_000
#: Pause between two peeks that found nothing new, in seconds.
SQL_POLL_INTERVAL_S = 0.005
#: Transactions one streaming `read()` returns at most.
MAX_TRANSACTIONS = 500
#: Least time between two status updates sent because the flushed LSN moved, in
#: seconds. Confirming per transaction must not mean one message per transaction.
FEEDBACK_INTERVAL_S = 1.0
#: Longest time without any status update, in seconds; the server's default
#: wal_sender_timeout is 60 s and it also asks for replies when it wants them.
STATUS_INTERVAL_S = 10.0
#: Seconds START_REPLICATION, a status update or a clean stop may take.
IO_TIMEOUT_S = 30.0
#: Seconds `drop_slot` waits for a slot to be released by its last reader.
DROP_TIMEOUT_S = 10.0
#: Pause between two checks of whether a slot is still in use, in seconds.
DROP_POLL_S = 0.05

_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_XLOG_DATA = ord("w")
_KEEPALIVE = ord("k")
#: 'w', WAL start, WAL end, server time: the header before a pgoutput message.
_XLOG_HEADER_SIZE = 25
_U64 = struct.Struct("!Q")
_KEEPALIVE_BODY = struct.Struct("!QqB")
_STATUS = struct.Struct("!BQQQqB")

_PEEK = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes("
    "%s, NULL, %s, 'proto_version', %s, 'publication_names', %s)"
)
_ADVANCE = "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)"
_SLOT = (
    "SELECT active, confirmed_flush_lsn::text, restart_lsn::text,"
    " pg_current_wal_lsn()::text, plugin, database = current_database()"
    " FROM pg_replication_slots WHERE slot_name = %s"
)


class SlotError(CdcLoadError):
    """A slot or publication could not be created, read, advanced or dropped."""


@dataclass(frozen=True, slots=True)
class SourceTransaction:
    """One committed source transaction, as the slot delivered it."""

    xid: int
    #: LSN of the commit record.
    commit_lsn: int
    #: LSN just past the commit record: what to `confirm` once applied.
    end_lsn: int
    #: Commit time on the server, UTC.
    commit_ts: datetime
    #: The same, in microseconds since the Unix epoch.
    commit_time_us: int
    #: Inserts on the events table, in the order they were made.
    rows: tuple[EventRow, ...]
    #: Changes on other published tables, and updates or deletes on events.
    other_changes: int = 0
    #: True when the transaction truncated the events table.
    truncated_events: bool = False


@dataclass(frozen=True, slots=True)
class SlotState:
    """Where a slot stands against the server's WAL, LSNs as ints."""

    slot: str
    #: Whether a session is reading the slot right now.
    active: bool
    #: Everything before this is confirmed and will not be sent again.
    confirmed_flush_lsn: int
    #: Oldest WAL the slot still needs; the server keeps WAL from here on.
    restart_lsn: int
    #: The server's pg_current_wal_lsn() when the state was read.
    current_lsn: int
    #: WAL written but not yet confirmed: current - confirmed_flush.
    backlog_bytes: int
    #: WAL the slot forces the server to keep: current - restart.
    retained_bytes: int


def _check_name(name: str, kind: str) -> None:
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"{kind} name must be 1-63 lowercase letters, digits or underscores "
            f"and not start with a digit: {name!r}"
        )


def _table_name(table: str) -> tuple[str | None, str]:
    schema, _, name = table.rpartition(".")
    if not name:
        raise ValueError(f"not a table name: {table!r}")
    return schema or None, name


def _error_text(result: pq.abc.PGresult | None) -> str:
    if result is None:
        return "no result"
    text = result.error_message.decode(errors="replace").strip()
    return text or f"unexpected result status {pq.ExecStatus(result.status).name}"


def _connect(
    conninfo: str,
    *,
    application_name: str,
    connect_timeout_s: float,
    replication: bool,
) -> psycopg.Connection[Any]:
    options: dict[str, Any] = {
        "autocommit": True,
        "application_name": application_name,
        # libpq takes whole seconds and treats 0 as "wait forever".
        "connect_timeout": max(1, round(connect_timeout_s)),
    }
    if replication:
        options["replication"] = "database"
    try:
        return psycopg.Connection.connect(conninfo, **options)
    except psycopg.Error as ex:
        raise SlotError(f"cannot connect as {application_name}: {ex}") from ex


class _Assembler:
    """Group the pgoutput messages of one decoding session into transactions."""

    def __init__(self, table: str) -> None:
        self._schema, self._table = _table_name(table)
        self._relations: dict[int, Relation] = {}
        self._event_oids: set[int] = set()
        self._begin: Begin | None = None
        # TODO(memory): a transaction's rows are held until its commit arrives,
        # so one huge source transaction (a bulk load) is held whole. Protocol
        # version 2 streaming would bound this, at the price of handling aborts.
        self._rows: list[EventRow] = []
        self._other = 0
        self._truncated = False
        #: `end_lsn` of the last transaction completed in this session.
        self.last_end_lsn = 0

    @property
    def in_transaction(self) -> bool:
        """Tell whether a Begin was fed without its Commit yet."""
        return self._begin is not None

    def feed(self, buf: bytes | memoryview) -> SourceTransaction | None:
        """Take the next message; return the transaction its Commit completes.

        Raises DecodeError for bytes that do not parse or rows that break the
        events contract, and SlotError for messages out of protocol order.
        """
        message = decode(buf)
        if isinstance(message, Insert):
            relation = self._relation(message.relation_oid)
            if relation.oid in self._event_oids:
                self._rows.append(event_row(relation, message))
            else:
                self._other += 1
        elif isinstance(message, Begin):
            if self._begin is not None:
                raise SlotError(f"begin of xid {message.xid} inside a transaction")
            self._begin = message
        elif isinstance(message, Commit):
            return self._commit(message)
        elif isinstance(message, Relation):
            self._relations[message.oid] = message
            if message.name == self._table and self._schema in (
                None,
                message.namespace,
            ):
                self._event_oids.add(message.oid)
            else:
                self._event_oids.discard(message.oid)
        elif isinstance(message, Update | Delete):
            relation = self._relation(message.relation_oid)
            if relation.oid in self._event_oids:
                logger.warning(
                    "%s on append-only table %s at xid %s; not applied",
                    type(message).__name__.lower(),
                    relation.name,
                    self._begin.xid if self._begin else None,
                )
            self._other += 1
        elif isinstance(message, Truncate):
            if self._event_oids.intersection(message.relation_oids):
                self._truncated = True
            self._other += 1
        elif isinstance(message, StreamStart | StreamStop | StreamCommit | StreamAbort):
            raise SlotError(
                f"streamed transaction message {type(message).__name__} in a "
                f"protocol version {PROTO_VERSION} session"
            )
        # Type, Origin, Message and Unknown carry nothing the consumer applies.
        return None

    def _relation(self, oid: int) -> Relation:
        if self._begin is None:
            raise SlotError(f"change on relation {oid} outside a transaction")
        relation = self._relations.get(oid)
        if relation is None:
            raise SlotError(f"change on relation {oid} before its description")
        return relation

    def _commit(self, commit: Commit) -> SourceTransaction:
        begin = self._begin
        if begin is None:
            raise SlotError(f"commit at {format_lsn(commit.commit_lsn)} without begin")
        if begin.final_lsn != commit.commit_lsn:
            raise SlotError(
                f"commit at {format_lsn(commit.commit_lsn)} does not match begin of "
                f"xid {begin.xid} at {format_lsn(begin.final_lsn)}"
            )
        transaction = SourceTransaction(
            xid=begin.xid,
            commit_lsn=commit.commit_lsn,
            end_lsn=commit.end_lsn,
            commit_ts=commit.commit_ts,
            commit_time_us=commit.commit_time_us,
            rows=tuple(self._rows),
            other_changes=self._other,
            truncated_events=self._truncated,
        )
        self._begin = None
        self._rows = []
        self._other = 0
        self._truncated = False
        self.last_end_lsn = commit.end_lsn
        return transaction


class SlotReader(abc.ABC):
    """Pull committed transactions from a logical slot and confirm applied ones.

    Use as a context manager, or call `close()`; confirmed positions not yet
    handed to the server are lost (and their transactions sent again) otherwise.
    """

    def __init__(self, slot: str, publication: str) -> None:
        _check_name(slot, "slot")
        _check_name(publication, "publication")
        #: Name of the slot this reader reads.
        self.slot = slot
        #: Publication whose tables the server decodes for this reader.
        self.publication = publication
        self._lock = threading.Lock()
        self._confirmed = 0

    @property
    def confirmed_lsn(self) -> int:
        """Return the highest LSN confirmed in this session, 0 before any."""
        with self._lock:
            return self._confirmed

    def confirm(self, lsn: int) -> None:
        """Record that every transaction with `end_lsn <= lsn` is durably applied.

        Call it only once the effect and its checkpoint are committed. It does
        no I/O: the server learns the position at a later `read()` or at
        `close()`. A lower LSN than one already confirmed is ignored.
        """
        with self._lock:
            if lsn > self._confirmed:
                self._confirmed = lsn

    @abc.abstractmethod
    def read(self, timeout_s: float = READ_TIMEOUT_S) -> list[SourceTransaction]:
        """Return the next committed transactions, waiting up to `timeout_s`.

        Returns as soon as at least one transaction is there, and an empty list
        once `timeout_s` passes without any. Raises SlotError if the slot cannot
        be read and DecodeError if the server sends what the decoder cannot
        accept; either way the reader is unusable: close it and open another,
        which starts again from the confirmed LSN.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Hand the confirmed LSN to the server and release the connection.

        Never raises for a failed goodbye: the connection is closed anyway and
        what was not confirmed on the server comes again. Idempotent.
        """

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class SqlSlotReader(SlotReader):
    """Read a slot by polling `pg_logical_slot_peek_binary_changes`.

    Each peek decodes again from the slot's restart_lsn, which can lag the
    confirmed LSN by a checkpoint's worth of WAL, so every poll costs the server
    work in proportion to that lag, not to what is new. Read-ahead is bounded by
    the window of `upto_nchanges` messages after the confirmed LSN: once the
    caller holds a full window unconfirmed, `read()` returns nothing new until it
    confirms.
    """

    def __init__(
        self,
        conninfo: str,
        slot: str,
        publication: str,
        *,
        table: str = EVENTS_TABLE,
        upto_nchanges: int = UPTO_NCHANGES,
        poll_interval_s: float = SQL_POLL_INTERVAL_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        application_name: str = SQL_APPLICATION_NAME,
    ) -> None:
        """Connect and check that the slot exists.

        Raises ValueError for a bad name or setting and SlotError if the server
        cannot be reached or the slot is missing or not a pgoutput slot here.
        """
        super().__init__(slot, publication)
        if upto_nchanges < 1:
            raise ValueError(f"upto_nchanges must be at least 1: {upto_nchanges!r}")
        if poll_interval_s <= 0:
            raise ValueError(f"poll_interval_s must be positive: {poll_interval_s!r}")
        _table_name(table)
        self._table = table
        self._upto_nchanges = upto_nchanges
        self._poll_interval_s = poll_interval_s
        self._delivered = 0
        self._closed = False
        self._conn = _connect(
            conninfo,
            application_name=application_name,
            connect_timeout_s=connect_timeout_s,
            replication=False,
        )
        try:
            self._advanced = _read_slot(self._conn, slot).confirmed_flush_lsn
        except BaseException:
            self._conn.close()
            raise
        logger.info(
            "reading slot %s by sql from %s, %s changes a peek",
            slot,
            format_lsn(self._advanced),
            upto_nchanges,
        )

    def read(self, timeout_s: float = READ_TIMEOUT_S) -> list[SourceTransaction]:
        if self._closed:
            raise SlotError(f"reader of slot {self.slot} is closed")
        deadline = time.monotonic() + timeout_s
        while True:
            self._advance()
            batch = self._peek()
            remaining = deadline - time.monotonic()
            if batch or remaining <= 0:
                return batch
            time.sleep(min(self._poll_interval_s, remaining))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._advance()
        except SlotError as ex:
            logger.warning("slot %s: final advance failed: %s", self.slot, ex)
        finally:
            self._conn.close()
        logger.info(
            "stopped reading slot %s at %s", self.slot, format_lsn(self._advanced)
        )

    def _advance(self) -> None:
        target = self.confirmed_lsn
        # The server refuses to move a slot backwards, and a no-op still costs a
        # decoding pass, so only move forwards.
        if target <= self._advanced:
            return
        try:
            self._conn.execute(_ADVANCE, (self.slot, format_lsn(target)))
        except psycopg.Error as ex:
            raise SlotError(
                f"cannot advance slot {self.slot} to {format_lsn(target)}: {ex}"
            ) from ex
        self._advanced = target
        logger.debug("advanced slot %s to %s", self.slot, format_lsn(target))

    def _peek(self) -> list[SourceTransaction]:
        # TODO(cost): each peek decodes again from restart_lsn, which PostgreSQL
        # 15 moves only past a running-xacts record (logged about every 15 s);
        # the server's work per poll grows with that distance, not with what is
        # new. PostgreSQL 16's pg_log_standby_snapshot() could shorten it.
        try:
            cursor = self._conn.execute(
                _PEEK,
                (self.slot, self._upto_nchanges, str(PROTO_VERSION), self.publication),
                binary=True,
            )
            rows = cursor.fetchall()
        except psycopg.Error as ex:
            raise SlotError(f"cannot peek slot {self.slot}: {ex}") from ex

        # Every peek is a new decoding session: relations are described again.
        assembler = _Assembler(self._table)
        batch = []
        for (data,) in rows:
            transaction = assembler.feed(data)
            if transaction is not None and transaction.end_lsn > self._delivered:
                batch.append(transaction)
        if batch:
            self._delivered = batch[-1].end_lsn
        elif len(rows) >= self._upto_nchanges:
            logger.debug(
                "slot %s: peek window holds only unconfirmed transactions", self.slot
            )
        return batch


class StreamSlotReader(SlotReader):
    """Read a slot over the streaming replication protocol.

    The server pushes changes as they commit; the reader pulls them from libpq's
    buffer only when `read()` is called, and reads the socket only once that
    buffer holds no whole message, so a slow caller makes TCP push back on the
    server instead of filling memory.

    Status updates carry the confirmed LSN as the flushed position. While every
    transaction received has been confirmed and none is half received, the
    flushed position follows the server's sent position instead, so an idle
    slot does not hold WAL that other databases write.
    """

    def __init__(
        self,
        conninfo: str,
        slot: str,
        publication: str,
        *,
        table: str = EVENTS_TABLE,
        start_lsn: int = 0,
        max_transactions: int = MAX_TRANSACTIONS,
        feedback_interval_s: float = FEEDBACK_INTERVAL_S,
        status_interval_s: float = STATUS_INTERVAL_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        application_name: str = STREAM_APPLICATION_NAME,
    ) -> None:
        """Connect and start replication at `start_lsn` (0: the confirmed LSN).

        The server starts at the slot's confirmed LSN when `start_lsn` is older.
        Raises ValueError for a bad name or setting and SlotError if the server
        cannot be reached, or refuses replication (slot missing or in use, no
        such publication, not enough wal senders).
        """
        super().__init__(slot, publication)
        if max_transactions < 1:
            raise ValueError(f"max_transactions must be at least 1: {max_transactions}")
        if not 0 < feedback_interval_s <= status_interval_s:
            raise ValueError(
                "need 0 < feedback_interval_s <= status_interval_s: "
                f"{feedback_interval_s!r}, {status_interval_s!r}"
            )
        self._assembler = _Assembler(table)
        self._max_transactions = max_transactions
        self._feedback_interval_s = feedback_interval_s
        self._status_interval_s = status_interval_s
        #: Highest WAL position the server said it has sent everything up to.
        self._received = 0
        self._reported_write = 0
        self._reported_flush = 0
        self._last_status = time.monotonic()
        self._in_copy = False
        self._closed = False
        self._failed: BaseException | None = None
        self._odd_message_logged = False
        self._conn = _connect(
            conninfo,
            application_name=application_name,
            connect_timeout_s=connect_timeout_s,
            replication=True,
        )
        self._pgconn = self._conn.pgconn
        # Looked up now, not at import: gevent may have patched selectors since.
        self._selector = selectors.DefaultSelector()
        self._events = selectors.EVENT_READ
        try:
            self._selector.register(self._pgconn.socket, self._events)
            self._start(start_lsn)
        except psycopg.Error as ex:
            self._abandon()
            raise SlotError(f"cannot start replication of slot {slot}: {ex}") from ex
        except BaseException:
            self._abandon()
            raise
        logger.info(
            "streaming slot %s from %s as %s",
            slot,
            format_lsn(start_lsn),
            application_name,
        )

    def read(self, timeout_s: float = READ_TIMEOUT_S) -> list[SourceTransaction]:
        if self._failed is not None:
            raise SlotError(
                f"reader of slot {self.slot} failed earlier: {self._failed}"
            ) from self._failed
        if self._closed or not self._in_copy:
            raise SlotError(f"reader of slot {self.slot} is not streaming")
        try:
            return self._read(time.monotonic() + timeout_s)
        except psycopg.Error as ex:
            self._failed = ex
            raise SlotError(f"lost replication of slot {self.slot}: {ex}") from ex
        except BaseException as ex:
            # The stream is now somewhere inside a transaction whose start was
            # consumed: reading on could hand out that transaction incomplete.
            self._failed = ex
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._in_copy:
                self._stop()
        except (psycopg.Error, SlotError) as ex:
            logger.warning(
                "slot %s: replication did not stop cleanly: %s", self.slot, ex
            )
        finally:
            self._abandon()
        logger.info(
            "stopped streaming slot %s, flushed %s",
            self.slot,
            format_lsn(self._reported_flush),
        )

    def _abandon(self) -> None:
        self._in_copy = False
        self._selector.close()
        self._conn.close()

    def _read(self, deadline: float) -> list[SourceTransaction]:
        pgconn = self._pgconn
        batch: list[SourceTransaction] = []
        while len(batch) < self._max_transactions:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                tag = data[0]
                if tag == _XLOG_DATA:
                    (wal_end,) = _U64.unpack_from(data, 9)
                    if wal_end > self._received:
                        self._received = wal_end
                    transaction = self._assembler.feed(data[_XLOG_HEADER_SIZE:])
                    if transaction is not None:
                        batch.append(transaction)
                elif tag == _KEEPALIVE:
                    self._keepalive(data)
                elif not self._odd_message_logged:
                    self._odd_message_logged = True
                    logger.warning(
                        "slot %s: skipping copy message %r; not logged again",
                        self.slot,
                        chr(tag),
                    )
                continue
            if nbytes == -1:
                self._server_stopped()

            # Nothing whole is buffered: the only moment to return or to wait.
            now = time.monotonic()
            self._maybe_send_status(now)
            if batch:
                # Take what the socket holds already, without waiting, so that
                # one call returns all that has arrived.
                if not self._wait(selectors.EVENT_READ, 0.0):
                    return batch
                pgconn.consume_input()
                continue
            remaining = deadline - now
            if remaining <= 0:
                return batch
            # TODO(latency): a confirm() from another thread during this wait is
            # reported when the wait ends, up to status_interval_s later; waking
            # the selector through a pipe would report it within one feedback.
            wait_s = min(remaining, self._status_wait(now))
            if self._wait(selectors.EVENT_READ, wait_s):
                pgconn.consume_input()
        self._maybe_send_status(time.monotonic())
        return batch

    def _keepalive(self, data: memoryview) -> None:
        wal_end, _, reply = _KEEPALIVE_BODY.unpack_from(data, 1)
        if wal_end > self._received:
            self._received = wal_end
        # An unrequested keepalive means the server waits for WAL while our
        # written position is behind what it sent; it repeats it every time it
        # wakes up until we answer, so answer once per new position.
        if reply or wal_end > self._reported_write:
            self._send_status()

    def _flush_position(self) -> int:
        confirmed = self.confirmed_lsn
        assembler = self._assembler
        if not assembler.in_transaction and confirmed >= assembler.last_end_lsn:
            return max(confirmed, self._received)
        return confirmed

    def _status_wait(self, now: float) -> float:
        interval = self._status_interval_s
        if self._flush_position() > self._reported_flush:
            interval = self._feedback_interval_s
        return max(0.0, self._last_status + interval - now)

    def _maybe_send_status(self, now: float) -> None:
        elapsed = now - self._last_status
        if elapsed >= self._status_interval_s or (
            elapsed >= self._feedback_interval_s
            and self._flush_position() > self._reported_flush
        ):
            self._send_status()

    def _send_status(self) -> None:
        deadline = time.monotonic() + IO_TIMEOUT_S
        flush = self._flush_position()
        write = max(self._received, flush)
        now_us = time.time_ns() // 1000 - PG_EPOCH_UNIX_US
        # Applied equals flushed: the caller confirms only what it applied.
        message = _STATUS.pack(ord("r"), write, flush, flush, now_us, 0)
        while self._pgconn.put_copy_data(message) == 0:
            self._flush(deadline)
        self._flush(deadline)
        self._reported_write = write
        self._reported_flush = flush
        self._last_status = time.monotonic()
        logger.debug(
            "slot %s: status write %s flush %s",
            self.slot,
            format_lsn(write),
            format_lsn(flush),
        )

    def _start(self, start_lsn: int) -> None:
        command = (
            f"START_REPLICATION SLOT {self.slot} LOGICAL {format_lsn(start_lsn)} "
            f"(proto_version '{PROTO_VERSION}', "
            f"publication_names '{self.publication}')"
        )
        deadline = time.monotonic() + IO_TIMEOUT_S
        self._pgconn.send_query(command.encode())
        self._flush(deadline)
        result = self._next_result(deadline)
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            self._drain_results(deadline)
            raise SlotError(
                f"server refused replication of slot {self.slot}: {_error_text(result)}"
            )
        self._in_copy = True

    def _stop(self) -> None:
        self._send_status()
        deadline = time.monotonic() + IO_TIMEOUT_S
        while self._pgconn.put_copy_end(None) == 0:
            self._flush(deadline)
        self._flush(deadline)

        # The server may have sent more before it saw CopyDone; it is dropped
        # unconfirmed, so it comes again next time.
        discarded = 0
        while True:
            nbytes, _ = self._pgconn.get_copy_data(1)
            if nbytes > 0:
                discarded += 1
                continue
            if nbytes == -1:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SlotError("timed out waiting for the server to end the copy")
            if self._wait(selectors.EVENT_READ, remaining):
                self._pgconn.consume_input()
        self._in_copy = False
        self._drain_results(deadline)
        if discarded:
            logger.debug(
                "slot %s: dropped %s messages received while stopping",
                self.slot,
                discarded,
            )

    def _server_stopped(self) -> None:
        self._in_copy = False
        deadline = time.monotonic() + IO_TIMEOUT_S
        result = self._next_result(deadline)
        text = _error_text(result)
        self._drain_results(deadline)
        raise SlotError(f"server ended replication of slot {self.slot}: {text}")

    def _next_result(self, deadline: float) -> pq.abc.PGresult | None:
        self._pgconn.consume_input()
        while self._pgconn.is_busy():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SlotError("timed out waiting for the server's answer")
            if self._wait(selectors.EVENT_READ, remaining):
                self._pgconn.consume_input()
        return self._pgconn.get_result()

    def _drain_results(self, deadline: float) -> None:
        # libpq is ready for another command only once get_result says None.
        while self._next_result(deadline) is not None:
            pass

    def _flush(self, deadline: float) -> None:
        # In nonblocking mode libpq sends what the socket takes; the rest waits
        # for the socket, and reading meanwhile keeps the server from blocking.
        while self._pgconn.flush() == 1:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SlotError("timed out sending to the server")
            ready = self._wait(selectors.EVENT_READ | selectors.EVENT_WRITE, remaining)
            if ready & selectors.EVENT_READ:
                self._pgconn.consume_input()

    def _wait(self, events: int, timeout_s: float) -> int:
        if events != self._events:
            self._selector.modify(self._pgconn.socket, events)
            self._events = events
        ready = 0
        for _, mask in self._selector.select(timeout_s):
            ready |= mask
        return ready


def _read_slot(conn: psycopg.Connection[Any], name: str) -> SlotState:
    try:
        row = conn.execute(_SLOT, (name,)).fetchone()
    except psycopg.Error as ex:
        raise SlotError(f"cannot read slot {name}: {ex}") from ex
    if row is None:
        raise SlotError(f"slot {name} does not exist")
    active, confirmed, restart, current, plugin, here = row
    if plugin != "pgoutput" or not here:
        raise SlotError(f"slot {name} is not a pgoutput slot of this database")
    if confirmed is None or restart is None:
        raise SlotError(f"slot {name} has lost WAL it needs and cannot be read")
    confirmed_lsn = parse_lsn(confirmed)
    restart_lsn = parse_lsn(restart)
    current_lsn = parse_lsn(current)
    return SlotState(
        slot=name,
        active=bool(active),
        confirmed_flush_lsn=confirmed_lsn,
        restart_lsn=restart_lsn,
        current_lsn=current_lsn,
        backlog_bytes=current_lsn - confirmed_lsn,
        retained_bytes=current_lsn - restart_lsn,
    )


def slot_state(conn: psycopg.Connection[Any], name: str) -> SlotState:
    """Return where slot `name` stands against the server's current WAL position.

    Raises ValueError for a bad name and SlotError if the slot is missing, is not
    a pgoutput slot of the connection's database, or has lost WAL it needed.
    """
    _check_name(name, "slot")
    return _read_slot(conn, name)


def ensure_publication(
    conn: psycopg.Connection[Any],
    name: str,
    tables: Sequence[str] = (EVENTS_TABLE,),
) -> bool:
    """Make publication `name` publish `tables`; tell if it was created now.

    An existing publication is kept, and a table it lacks is added to it: one made
    before a table existed (the consumer's drain markers came later) is brought up
    to date rather than refused. Raises ValueError for a bad name and SlotError if
    a table does not exist or the server refuses.
    """
    _check_name(name, "publication")
    targets = []
    for table in tables:
        schema, relname = _table_name(table)
        targets.append(
            sql.Identifier(relname)
            if schema is None
            else sql.Identifier(schema, relname)
        )
    publication = sql.Identifier(name)
    created = False
    try:
        try:
            with conn.transaction():
                exists = conn.execute(
                    "SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)
                ).fetchone()
                if exists is None:
                    create = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}")
                    conn.execute(
                        create.format(publication, sql.SQL(", ").join(targets))
                    )
                    created = True
        except pg_errors.DuplicateObject:
            # Another process created it between our check and our create.
            created = False
        for table, target in zip(tables, targets, strict=True):
            published = conn.execute(
                "SELECT 1 FROM pg_publication_tables p"
                " JOIN pg_class c ON c.oid = to_regclass(%s)"
                " JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE p.pubname = %s AND p.schemaname = n.nspname"
                " AND p.tablename = c.relname",
                (target.as_string(conn), name),
            ).fetchone()
            if published is None:
                add = sql.SQL("ALTER PUBLICATION {} ADD TABLE {}")
                conn.execute(add.format(publication, target))
                logger.info("added table %s to publication %s", table, name)
    except psycopg.Error as ex:
        raise SlotError(f"cannot ensure publication {name}: {ex}") from ex
    if created:
        logger.info("created publication %s for %s", name, ", ".join(tables))
    return created


def ensure_slot(conn: psycopg.Connection[Any], name: str) -> bool:
    """Create logical slot `name` with pgoutput unless it exists; tell if it did.

    Creating waits until every transaction running on the server has ended, so
    a long transaction anywhere delays it. Raises ValueError for a bad name and
    SlotError if an existing slot of that name is not a pgoutput slot of this
    database, or the server refuses (for instance, no free slot).
    """
    _check_name(name, "slot")
    created = False
    try:
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                    (name,),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')",
                        (name,),
                    )
                    created = True
        except pg_errors.DuplicateObject:
            created = False
    except psycopg.Error as ex:
        raise SlotError(f"cannot ensure slot {name}: {ex}") from ex
    state = _read_slot(conn, name)
    if created:
        logger.info(
            "created slot %s at %s", name, format_lsn(state.confirmed_flush_lsn)
        )
    return created


def drop_slot(
    conn: psycopg.Connection[Any], name: str, *, timeout_s: float = DROP_TIMEOUT_S
) -> bool:
    """Drop slot `name` if it exists; tell whether it did.

    A reader that just closed may hold the slot for a moment, so this waits up
    to `timeout_s` for it to be released. Raises ValueError for a bad name and
    SlotError if the slot stays in use or the server refuses.
    """
    _check_name(name, "slot")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with conn.transaction():
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                    (name,),
                ).fetchone()
                if row is None:
                    return False
                pid = row[0]
                if pid is None:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
                    logger.info("dropped slot %s", name)
                    return True
        except pg_errors.UndefinedObject:
            return False
        except pg_errors.ObjectInUse:
            pid = "another session"
        except psycopg.Error as ex:
            raise SlotError(f"cannot drop slot {name}: {ex}") from ex
        if time.monotonic() >= deadline:
            raise SlotError(f"slot {name} still in use by pid {pid} after {timeout_s}s")
        time.sleep(DROP_POLL_S)
