"""The account users: the workers of the load test.

Each task is one operation, reported as one Locust request of type `PG` named after
the command, with its response time measured around the whole operation (permit,
connection, statements). A failure carries a stable exception name per kind, so
Locust's error table has one row per kind, not one per message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import gevent
from locust import User, constant, constant_throughput
from locust.exception import StopUser

from cdc_users import hooks
from cdc_users.harness import Harness
from services import logs
from services.config import TaskWeights
from services.errors import BreakerOpen, OperationFailure
from services.eventstore import deposit, open_account, transfer, withdraw

logger = logs.get("users")


def _operation(name: str, body: Callable[[Harness], object]) -> Callable[[Any], None]:
    # A body may return the request type of the store that answered it.
    def task(user: AccountUser) -> None:
        user.operate(name, body)

    task.__name__ = name
    return task


def _deposit(h: Harness) -> object:
    return h.write(deposit(h.pick(), h.amount()))


def _withdraw(h: Harness) -> object:
    return h.write(withdraw(h.pick(), h.amount()))


def _transfer(h: Harness) -> object:
    a, b = h.pick_pair()
    return h.write(transfer(a, b, h.amount()))


def _balance(h: Harness) -> object:
    return h.read_balance(h.pick())


def _open(h: Harness) -> object:
    outcome = h.write(open_account(h.profile.workload.opening_balance))
    h.accounts.append(outcome.account_id)
    return outcome


TASKS: dict[str, Callable[[Any], None]] = {
    "deposit": _operation("deposit", _deposit),
    "withdraw": _operation("withdraw", _withdraw),
    "transfer": _operation("transfer", _transfer),
    "balance": _operation("balance", _balance),
    "open_account": _operation("open_account", _open),
}


def configure(weights: TaskWeights, *, target_rate: float, users: int) -> None:
    """Give the users the profile's task weights and pace."""
    chosen: list[Any] = []
    for name, task in TASKS.items():
        chosen += [task] * getattr(weights, name)
    AccountUser.tasks = chosen
    if target_rate > 0:
        # Each user paces itself to its share of the rate; Locust's own timer.
        AccountUser.wait_time = constant_throughput(target_rate / max(1, users))
    else:
        AccountUser.wait_time = constant(0)


class AccountUser(User):
    """Opens accounts, deposits, withdraws, transfers and reads balances."""

    # Tasks come from the profile's weights, set by configure_tasks() in init.
    wait_time = constant(0)

    def operate(self, name: str, body: Callable[[Harness], object]) -> None:
        """Run one operation through the gates and report it to Locust.

        The in-flight permit is taken by the harness, where the store is chosen
        (see `Harness.write`).
        """
        harness = hooks.current()
        # Waiting out a utilization pause is not part of the operation: it has not
        # started, so it neither counts as an operation nor adds to its latency.
        wait = harness.pause.remaining()
        if wait > 0:
            gevent.sleep(wait)
        if not harness.budget.claim():
            raise StopUser()

        started = time.perf_counter()
        failure: OperationFailure | None = None
        request_type = hooks.REQUEST_TYPE
        try:
            harness.breaker.check()
            answered = body(harness)
            if isinstance(answered, str):
                request_type = answered
        except OperationFailure as exc:
            failure = exc
            logger.debug("%s failed: %s", name, exc)
        elapsed_ms = (time.perf_counter() - started) * 1000

        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=elapsed_ms,
            response_length=0,
            # A fresh instance without the message: one error row per kind.
            exception=type(failure)() if failure is not None else None,
            context={},
        )
        if isinstance(failure, BreakerOpen):
            gevent.sleep(harness.breaker.remaining())
