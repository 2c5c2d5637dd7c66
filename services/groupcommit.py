"""The batched write path: a bounded queue and group-commit writers.

Callers put a command in a queue of `channel_buffer_size` and wait for their own
outcome. Each of `batch_processor_count` writers takes up to `batch_size` commands,
locks the heads they touch in account order (so writers never deadlock and never
see a version conflict), plans every command against those heads in queue order
with the same rules as the direct path, and appends all their events in one
transaction. A business rejection fails only its own command; a database error
fails the whole batch, since nothing of it committed.

Written with the standard library's threads and queues: under gevent (patched) they
are greenlets, and the module works the same in a plain process.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psycopg

from services import green, logs
from services.errors import (
    CdcLoadError,
    OperationFailure,
    OperationTimeout,
    QueueFull,
    ServiceUnavailable,
)
from services.eventstore import (
    Command,
    Head,
    Outcome,
    Step,
    accounts_of,
    advance,
    plan,
    translate,
    validate,
)
from services.pool import Conn, Pool
from services.sqlarrays import array_literal

logger = logs.get("groupcommit")

SQL_LOCK = (
    "SELECT account_id, version, balance FROM accounts"
    " WHERE account_id = ANY(%s::bigint[]) ORDER BY account_id FOR UPDATE"
)
SQL_OPEN = (
    "INSERT INTO accounts (version, balance)"
    " SELECT 1, b FROM unnest(%s::bigint[]) AS b RETURNING account_id"
)
SQL_EVENTS = """
INSERT INTO events (account_id, version, event_type, delta, transaction_id)
SELECT * FROM unnest(%s::bigint[], %s::integer[], %s::text[], %s::bigint[], %s::uuid[])
"""
SQL_HEADS = """
UPDATE accounts AS a SET version = h.version, balance = h.balance
FROM unnest(%s::bigint[], %s::integer[], %s::bigint[])
    AS h(account_id, version, balance)
WHERE a.account_id = h.account_id
"""


@dataclass(slots=True)
class Pending:
    """A queued command: its caller waits on `done` for `outcome` or `error`."""

    cmd: Command
    deadline: float
    done: Any = field(default_factory=green.event)
    outcome: Outcome | None = None
    error: OperationFailure | None = None


@dataclass(slots=True)
class _EventRows:
    """The events of one batch, column by column, for one unnest() insert."""

    ids: list[int] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    deltas: list[int] = field(default_factory=list)
    txs: list[uuid.UUID] = field(default_factory=list)

    def add(
        self, tx: uuid.UUID, account: int, version: int, kind: str, delta: int
    ) -> None:
        self.ids.append(account)
        self.versions.append(version)
        self.kinds.append(kind)
        self.deltas.append(delta)
        self.txs.append(tx)

    def add_steps(self, tx: uuid.UUID, steps: list[Step]) -> None:
        for s in steps:
            self.add(tx, s.account_id, s.expected_version + 1, s.event_type, s.delta)


@dataclass
class BatchStats:
    """Totals of the writers since they started."""

    batches: int = 0
    commands: int = 0
    largest_batch: int = 0
    expired: int = 0
    failed_batches: int = 0


class GroupCommitter:
    """Group-commit writers on the event-store pool."""

    def __init__(
        self,
        pool: Pool,
        *,
        batch_size: int,
        writers: int,
        queue_size: int,
        write_deadline_s: float,
    ) -> None:
        self.pool = pool
        self.batch_size = batch_size
        self.write_deadline_s = write_deadline_s
        self.stats = BatchStats()
        self._queue: queue.Queue[Pending | None] = green.queue(queue_size)
        self._writers = [
            threading.Thread(target=self._run, name=f"group-commit-{n}", daemon=True)
            for n in range(writers)
        ]
        self._closed = False
        self._failure: BaseException | None = None

    def start(self) -> None:
        """Start the writers."""
        for writer in self._writers:
            writer.start()
        logger.info(
            "started %s group-commit writers: batch size %s, queue %s",
            len(self._writers),
            self.batch_size,
            self._queue.maxsize,
        )

    def submit(self, cmd: Command) -> Outcome:
        """Queue a command and wait for its outcome, within the write deadline.

        Raise the command's failure kind; `QueueFull` if the queue stays full, and
        `OperationTimeout` if the outcome is not known in time. A timed-out command
        that a writer had already taken may still commit: its outcome is unknown,
        as with any client-side timeout.
        """
        if self._failure is not None:
            raise ServiceUnavailable("a group-commit writer died") from self._failure
        if self._closed:
            raise ServiceUnavailable("the group committer is closed")
        validate(cmd)
        limit = self.write_deadline_s
        pending = Pending(cmd, time.monotonic() + limit)
        try:
            self._queue.put(pending, timeout=limit)
        except queue.Full:
            raise QueueFull(
                f"queue of {self._queue.maxsize} full for {limit:g} s"
            ) from None
        remaining = pending.deadline - time.monotonic()
        if not pending.done.wait(timeout=max(0.0, remaining)):
            raise OperationTimeout(f"{cmd.kind} passed its {limit:g} s deadline")
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    def close(self, timeout: float = 10.0) -> None:
        """Let the writers finish what is queued, then stop them."""
        if self._closed:
            return
        self._closed = True
        for _ in self._writers:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for writer in self._writers:
            writer.join(max(0.0, deadline - time.monotonic()))
        logger.info(
            "stopped group-commit writers: %s batches, %s commands, largest %s",
            self.stats.batches,
            self.stats.commands,
            self.stats.largest_batch,
        )

    # Writers.

    def _run(self) -> None:
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < self.batch_size:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(batch)
                if stop:
                    return
        except BaseException as exc:  # stored and re-raised to callers by submit()
            self._failure = exc
            logger.error("group-commit writer stopped: %r", exc)
            raise

    def _commit(self, batch: list[Pending]) -> None:
        now = time.monotonic()
        live: list[Pending] = []
        for item in batch:
            if item.deadline <= now:
                # Its caller has given up: never apply it behind the caller's back.
                self.stats.expired += 1
                item.error = OperationTimeout("expired in the group-commit queue")
                item.done.set()
            else:
                live.append(item)
        if not live:
            return

        try:
            with (
                self.pool.connection(statement_timeout_s=self.write_deadline_s) as conn,
                conn.transaction(),
            ):
                apply_batch(conn, live)
        except (psycopg.Error, CdcLoadError) as exc:
            failure = translate(exc) if isinstance(exc, psycopg.Error) else exc
            if not isinstance(failure, OperationFailure):
                failure = OperationFailure(str(failure))
            self.stats.failed_batches += 1
            logger.warning("batch of %s failed: %s", len(live), failure)
            for item in live:
                item.outcome = None
                item.error = failure
                item.done.set()
            return

        self.stats.batches += 1
        self.stats.commands += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        for item in live:
            item.done.set()


def apply_batch(conn: Conn, batch: list[Pending]) -> None:
    """Lock, plan and append a batch inside the caller's transaction on `conn`.

    Sets each item's `outcome`, or its `error` for a business rejection; a driver
    error propagates and nothing of the batch commits. Used by the writers and by
    the bench's bare writer.
    """
    ids = sorted({a for item in batch for a in accounts_of(item.cmd)})
    lit = array_literal  # see services.sqlarrays
    rows = conn.execute(SQL_LOCK, (lit(ids),)).fetchall() if ids else []
    heads = {int(r[0]): Head(int(r[1]), int(r[2])) for r in rows}

    events = _EventRows()
    opens = [item for item in batch if item.cmd.kind == "open"]
    if opens:
        created = conn.execute(SQL_OPEN, (lit(i.cmd.amount for i in opens),))
        for item, row in zip(opens, created.fetchall(), strict=True):
            tx = item.cmd.transaction_id
            new_id = int(row[0])
            heads[new_id] = Head(1, item.cmd.amount)
            events.add(tx, new_id, 1, "AccountOpened", item.cmd.amount)
            item.outcome = Outcome(item.cmd.transaction_id, new_id)

    touched: set[int] = set()
    for item in batch:
        if item.cmd.kind == "open":
            continue
        try:
            steps = plan(item.cmd, heads)
        except OperationFailure as exc:
            item.error = exc
            continue
        events.add_steps(item.cmd.transaction_id, steps)
        advance(heads, steps)
        touched.update(s.account_id for s in steps)
        item.outcome = Outcome(item.cmd.transaction_id, item.cmd.account_id)

    if events.ids:
        conn.execute(
            SQL_EVENTS,
            (
                lit(events.ids),
                lit(events.versions),
                lit(events.kinds),
                lit(events.deltas),
                # 32 hex digits: also a uuid to PostgreSQL, and cheaper than str().
                lit(t.hex for t in events.txs),
            ),
        )
    if touched:
        order = sorted(touched)
        conn.execute(
            SQL_HEADS,
            (
                lit(order),
                lit(heads[a].version for a in order),
                lit(heads[a].balance for a in order),
            ),
        )
