"""The same transfers as the harness, with nothing of the harness around them.

    python -m scripts.bare direct --clients N --seconds S
    python -m scripts.bare batched --writers W --batch B --seconds S

`make bench` runs this beside Locust and pgbench to split the gap between them in
two: what the harness adds (Locust, the pool, the gates, the group-commit queue)
and what a Python client with psycopg costs at all.

- `direct`: N greenlets, each on a connection of its own, run transfers one after
  the other through `eventstore.append`, the direct path's two statements.
- `batched`: W greenlets, each on a connection of its own, commit batches of B
  random transfers through `groupcommit.apply_batch`, the writers' statements,
  with no callers, queue or events around them.

Accounts are the first `--accounts` of the event store, which must be set up.
Prints one JSON line: operations, seconds, operations per second, and for
`batched` the batch commit times. Exit 2 on bad arguments, 1 if the server
cannot be used.
"""

from __future__ import annotations

from services import green

# Before psycopg is imported, so that its connections yield (see services.green).
green.patch()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import gevent  # noqa: E402
import psycopg  # noqa: E402

from services.errors import Conflict, OperationFailure  # noqa: E402
from services.eventstore import append, existing_accounts, transfer  # noqa: E402
from services.groupcommit import Pending, apply_batch  # noqa: E402
from services.histogram import Histogram  # noqa: E402
from services.pool import Conn, application_name  # noqa: E402


@dataclass
class Tally:
    """What the greenlets did; they share it, under gevent without a lock."""

    operations: int = 0
    rejected: int = 0
    conflicts: int = 0
    batch_ms: Histogram = field(default_factory=Histogram)


def _direct(
    conn: Conn, ids: list[int], args: argparse.Namespace, until: float, t: Tally
) -> None:
    while time.monotonic() < until:
        a, b = random.sample(ids, 2)
        cmd = transfer(a, b, random.randint(1, args.max_amount))
        try:
            append(conn, cmd, args.attempts)
        except Conflict:
            t.conflicts += 1
        except OperationFailure:
            # An overdraft: pgbench skips the append too, and counts the run.
            t.rejected += 1
        t.operations += 1


def _batched(
    conn: Conn, ids: list[int], args: argparse.Namespace, until: float, t: Tally
) -> None:
    while time.monotonic() < until:
        batch = []
        for _ in range(args.batch):
            a, b = random.sample(ids, 2)
            batch.append(Pending(transfer(a, b, random.randint(1, args.max_amount)), 0))
        started = time.perf_counter()
        with conn.transaction():
            apply_batch(conn, batch)
        t.batch_ms.add((time.perf_counter() - started) * 1000)
        t.rejected += sum(1 for p in batch if p.error is not None)
        t.operations += len(batch)


def main(argv: list[str] | None = None) -> int:
    """Run one mode for `--seconds` and print what it did."""
    parser = argparse.ArgumentParser(prog="scripts.bare", description=__doc__)
    parser.add_argument("mode", choices=("direct", "batched"))
    parser.add_argument("--url", default=os.environ.get("DATABASE_URL", ""))
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--max-amount", type=int, default=5000)
    parser.add_argument("--attempts", type=int, default=5)
    args = parser.parse_args(argv)
    for name in ("clients", "writers", "batch", "accounts", "max_amount", "attempts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be 1 or more")
    if args.seconds <= 0:
        parser.error("--seconds must be more than 0")
    if not args.url:
        parser.error("--url or DATABASE_URL is needed")

    count = args.clients if args.mode == "direct" else args.writers
    work: Callable[[Conn, list[int], argparse.Namespace, float, Tally], None] = (
        _direct if args.mode == "direct" else _batched
    )
    try:
        conns: list[Conn] = [
            psycopg.connect(
                args.url, autocommit=True, application_name=application_name("bare")
            )
            for _ in range(count)
        ]
    except psycopg.Error as exc:
        print(f"scripts.bare: cannot connect: {exc}".strip(), file=sys.stderr)
        return 1
    try:
        ids = existing_accounts(conns[0], args.accounts)
        if len(ids) < 2:
            print(f"scripts.bare: {len(ids)} accounts; set up first", file=sys.stderr)
            return 1
        tally = Tally()
        started = time.monotonic()
        until = started + args.seconds
        greenlets = [gevent.spawn(work, c, ids, args, until, tally) for c in conns]
        gevent.joinall(greenlets, raise_error=True)
        elapsed = time.monotonic() - started
    except psycopg.Error as exc:
        print(f"scripts.bare: {type(exc).__name__}: {exc}".strip(), file=sys.stderr)
        return 1
    finally:
        for c in conns:
            c.close()

    result: dict[str, object] = {
        "mode": args.mode,
        "connections": count,
        "batch": args.batch if args.mode == "batched" else 1,
        "operations": tally.operations,
        "rejected": tally.rejected,
        "conflicts": tally.conflicts,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(tally.operations / elapsed, 1),
    }
    if tally.batch_ms.count:
        result["batch_ms"] = tally.batch_ms.summary()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
