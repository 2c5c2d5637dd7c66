"""Account commands on the event store: validation, planning and the direct path.

A command is checked in two steps. `validate` needs no state (amounts, same-account
transfers). `plan` needs each account's head and turns the command into the events
to append, or raises the business failure (unknown account, overdraft). Both write
paths use the same two functions, so their invariants cannot drift apart:

- the direct path (`EventStore.execute`) reads the heads, plans, and appends with
  `cdc_append`, one statement; a concurrent writer that moved a head first makes the
  version check fail, and the command is re-read and retried a bounded number of
  times before it is reported as `Conflict`;
- the batched path (`services.groupcommit`) locks the heads of a whole batch, plans
  every command against them in order, and appends them in one transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import psycopg
from psycopg import errors as pg_errors

from services import green, logs
from services.errors import (
    Conflict,
    InvalidAmount,
    OperationFailure,
    OperationTimeout,
    Overdraft,
    SameAccount,
    ServerError,
    TooManyConnections,
    UnknownAccount,
)
from services.pool import Conn, Pool
from services.sqlarrays import array_literal

logger = logs.get("eventstore")

T = TypeVar("T")

Kind = Literal["open", "deposit", "withdraw", "transfer"]

_EVENT_OF = {
    "deposit": ("MoneyDeposited",),
    "withdraw": ("MoneyWithdrawn",),
    "transfer": ("TransferDebited", "TransferCredited"),
}

# Arrays go as literals with casts (see services.sqlarrays).
SQL_HEADS = (
    "SELECT account_id, version, balance FROM accounts"
    " WHERE account_id = ANY(%s::bigint[])"
)
SQL_APPEND = (
    "SELECT cdc_append(%s, %s::bigint[], %s::integer[], %s::bigint[], %s::text[])"
)
SQL_OPEN = """
WITH opened AS (
    INSERT INTO accounts (version, balance)
    SELECT 1, b FROM unnest(%(balances)s::bigint[]) AS b
    RETURNING account_id, balance
)
INSERT INTO events (account_id, version, event_type, delta, transaction_id)
SELECT account_id, 1, 'AccountOpened', balance,
    coalesce(%(tx)s::uuid, gen_random_uuid())
FROM opened
RETURNING account_id
"""


@dataclass(frozen=True, slots=True)
class Command:
    """One account command. `account_id` is unused by `open`."""

    kind: Kind
    account_id: int
    amount: int
    to_account_id: int | None = None
    transaction_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(slots=True)
class Head:
    """An account's current version and balance (minor units)."""

    version: int
    balance: int


@dataclass(frozen=True, slots=True)
class Step:
    """One event a command appends: the version it expects to move from."""

    account_id: int
    expected_version: int
    delta: int
    event_type: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a successful command did."""

    transaction_id: uuid.UUID
    account_id: int
    attempts: int = 1


def deposit(account_id: int, amount: int) -> Command:
    """Make a deposit command."""
    return Command("deposit", account_id, amount)


def withdraw(account_id: int, amount: int) -> Command:
    """Make a withdrawal command."""
    return Command("withdraw", account_id, amount)


def transfer(from_id: int, to_id: int, amount: int) -> Command:
    """Make a transfer command: a debit and a credit in one transaction."""
    return Command("transfer", from_id, amount, to_account_id=to_id)


def open_account(opening_balance: int) -> Command:
    """Make a command that opens an account with a first deposit."""
    return Command("open", 0, opening_balance)


def validate(cmd: Command) -> None:
    """Refuse a command that is wrong whatever the state: a bad amount or pair."""
    if cmd.amount <= 0:
        raise InvalidAmount(f"amount {cmd.amount} is not positive")
    if cmd.kind == "transfer" and cmd.to_account_id == cmd.account_id:
        raise SameAccount(f"transfer from account {cmd.account_id} to itself")


def accounts_of(cmd: Command) -> tuple[int, ...]:
    """Return the existing accounts a command touches."""
    if cmd.kind == "open":
        return ()
    if cmd.kind == "transfer":
        assert cmd.to_account_id is not None
        return (cmd.account_id, cmd.to_account_id)
    return (cmd.account_id,)


def plan(cmd: Command, heads: Mapping[int, Head]) -> list[Step]:
    """Turn a validated command into its events, in account order.

    Raise `UnknownAccount` if a head is missing and `Overdraft` if a balance would
    go below zero. `heads` is not changed; see `advance`.
    """
    if cmd.kind == "open":
        raise ValueError("open is planned by the caller: it has no head yet")
    ids = accounts_of(cmd)
    for account_id in ids:
        if account_id not in heads:
            raise UnknownAccount(f"account {account_id} does not exist")

    deltas: tuple[int, ...]
    if cmd.kind == "deposit":
        deltas = (cmd.amount,)
    elif cmd.kind == "withdraw":
        deltas = (-cmd.amount,)
    else:
        deltas = (-cmd.amount, cmd.amount)
    source = heads[cmd.account_id]
    if source.balance - cmd.amount < 0 and cmd.kind != "deposit":
        raise Overdraft(
            f"account {cmd.account_id} holds {source.balance}, {cmd.amount} asked"
        )

    steps = [
        Step(account_id, heads[account_id].version, delta, event_type)
        for account_id, delta, event_type in zip(
            ids, deltas, _EVENT_OF[cmd.kind], strict=True
        )
    ]
    # Account order: two commands on the same pair lock rows in the same order, so
    # they wait for each other instead of deadlocking.
    steps.sort(key=lambda s: s.account_id)
    return steps


def advance(heads: dict[int, Head], steps: Iterable[Step]) -> None:
    """Apply planned steps to `heads`, as the database will once they commit."""
    for step in steps:
        head = heads[step.account_id]
        head.version += 1
        head.balance += step.delta


def translate(exc: psycopg.Error) -> OperationFailure:
    """Map a driver error to the failure kind the load test reports."""
    if isinstance(exc, pg_errors.QueryCanceled):
        return OperationTimeout(f"statement timeout: {_first_line(exc)}")
    if isinstance(exc, pg_errors.TooManyConnections):
        return TooManyConnections(_first_line(exc))
    if isinstance(exc, pg_errors.SerializationFailure | pg_errors.UniqueViolation):
        return Conflict(_first_line(exc))
    if isinstance(exc, pg_errors.CheckViolation):
        # The balance >= 0 constraint: only reachable if planning was bypassed.
        return Overdraft(_first_line(exc))
    return ServerError(f"{type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_heads(conn: Conn, ids: Sequence[int]) -> dict[int, Head]:
    """Read the heads of `ids` (missing accounts are simply absent)."""
    rows = conn.execute(SQL_HEADS, (array_literal(ids),)).fetchall()
    return {int(r[0]): Head(int(r[1]), int(r[2])) for r in rows}


def append(
    conn: Conn,
    cmd: Command,
    attempts: int,
    on_retry: Callable[[], None] | None = None,
) -> Outcome:
    """Read the heads, plan and append a command on `conn`: two statements.

    A version check that fails (another writer moved a head first) is re-read and
    retried, `on_retry` called each time, up to `attempts` in all; then `Conflict`.
    Business failures are raised as `plan` raises them; driver errors are not
    translated. Used by `EventStore.execute` and by the bench's bare client.
    """
    ids = accounts_of(cmd)
    for attempt in range(1, attempts + 1):
        steps = plan(cmd, read_heads(conn, ids))
        try:
            conn.execute(
                SQL_APPEND,
                (
                    cmd.transaction_id,
                    array_literal(s.account_id for s in steps),
                    array_literal(s.expected_version for s in steps),
                    array_literal(s.delta for s in steps),
                    array_literal(s.event_type for s in steps),
                ),
            )
        except pg_errors.SerializationFailure as exc:
            if attempt == attempts:
                raise Conflict(
                    f"{cmd.kind} on {ids}: versions moved {attempt} times"
                ) from exc
            if on_retry is not None:
                on_retry()
            continue
        return Outcome(cmd.transaction_id, cmd.account_id, attempt)
    raise AssertionError("unreachable: the loop returns or raises")


class EventStore:
    """Commands on the caller's pool, one transaction each (the direct path)."""

    def __init__(
        self,
        pool: Pool,
        *,
        write_deadline_s: float,
        read_deadline_s: float,
        conflict_attempts: int,
    ) -> None:
        self.pool = pool
        self.write_deadline_s = write_deadline_s
        self.read_deadline_s = read_deadline_s
        self.conflict_attempts = conflict_attempts
        #: Version checks that failed and were retried, since creation.
        self.conflicts_retried = 0

    def execute(self, cmd: Command) -> Outcome:
        """Run a command and return its outcome, or raise its failure kind.

        Raise `InvalidAmount`, `SameAccount`, `UnknownAccount`, `Overdraft`,
        `Conflict` (retries exhausted), `OperationTimeout` (deadline passed),
        `PoolTimeout` or `ServerError`. Nothing is written unless it returns.
        """
        validate(cmd)
        limit = self.write_deadline_s
        timeout = OperationTimeout(f"{cmd.kind} passed its {limit:g} s deadline")
        with (
            self.pool.connection(statement_timeout_s=limit) as conn,
            green.deadline(limit, timeout),
        ):
            try:
                if cmd.kind == "open":
                    new_id = self._open(conn, [cmd.amount], cmd.transaction_id)[0]
                    return Outcome(cmd.transaction_id, new_id)
                return append(conn, cmd, self.conflict_attempts, self._retried)
            except psycopg.Error as exc:
                raise translate(exc) from exc

    def _retried(self) -> None:
        self.conflicts_retried += 1

    def _open(self, conn: Conn, balances: list[int], tx: uuid.UUID) -> list[int]:
        # The command's own id, as the batched path writes it: the outcome names
        # the transaction that reconciliation will look for in the events.
        rows = conn.execute(SQL_OPEN, {"balances": balances, "tx": tx}).fetchall()
        return [int(r[0]) for r in rows]

    def read(self, query: Callable[[Conn], T]) -> T:
        """Run a read on the pool within the read deadline and return its result.

        Raise `OperationTimeout` past the deadline, `PoolTimeout`, or the
        translated driver error.
        """
        limit = self.read_deadline_s
        timeout = OperationTimeout(f"read passed its {limit:g} s deadline")
        with (
            self.pool.connection(statement_timeout_s=limit) as conn,
            green.deadline(limit, timeout),
        ):
            try:
                return query(conn)
            except psycopg.Error as exc:
                raise translate(exc) from exc

    def balance(self, account_id: int) -> Head:
        """Read an account's head; raise `UnknownAccount` if it does not exist."""
        head = self.read(lambda conn: read_heads(conn, [account_id]).get(account_id))
        if head is None:
            raise UnknownAccount(f"account {account_id} does not exist")
        return head


def create_accounts(
    conn: Conn,
    count: int,
    opening_balance: int,
    *,
    batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Open `count` accounts in batches of `batch_size`; return their ids in order.

    Each account gets an `AccountOpened` event with the opening balance as its
    delta. `progress(done, count)` is called after each batch.
    """
    if opening_balance <= 0:
        raise InvalidAmount(f"opening balance {opening_balance} is not positive")
    ids: list[int] = []
    while len(ids) < count:
        size = min(batch_size, count - len(ids))
        # Setup opens each account in a transaction of its own id.
        params = {"balances": [opening_balance] * size, "tx": None}
        rows = conn.execute(SQL_OPEN, params)
        ids.extend(int(r[0]) for r in rows.fetchall())
        if progress is not None:
            progress(len(ids), count)
    return ids


def existing_accounts(conn: Conn, limit: int) -> list[int]:
    """Return the ids of the first `limit` accounts, oldest first."""
    rows = conn.execute(
        "SELECT account_id FROM accounts ORDER BY account_id LIMIT %s", (limit,)
    ).fetchall()
    return [int(r[0]) for r in rows]
