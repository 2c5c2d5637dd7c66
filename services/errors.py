"""The project's exception tree.

Every error the harness raises on purpose derives from `CdcLoadError`. Driver and
Redis errors are translated into these at the boundary (`raise ... from`), so the
Locust layer reports a short, stable exception name per failure kind.
"""

from __future__ import annotations


class CdcLoadError(Exception):
    """Root of every error raised by this project."""


class ConfigError(CdcLoadError):
    """A profile or an override is invalid; the message is one line for the user."""


class ServiceUnavailable(CdcLoadError):
    """A server the harness needs does not answer, or lacks a required setting."""


class OperationFailure(CdcLoadError):
    """An account operation did not take effect. Subclasses name the kind."""

    #: Business rejections are expected outcomes of the workload, not failures of
    #: the system under test; the circuit breaker ignores them.
    business = False


class Overdraft(OperationFailure):
    """A withdrawal or transfer would make a balance negative."""

    business = True


class InvalidAmount(OperationFailure):
    """An amount is zero or negative."""

    business = True


class UnknownAccount(OperationFailure):
    """An account named by a command does not exist."""

    business = True


class SameAccount(OperationFailure):
    """A transfer names the same account on both sides."""

    business = True


class Conflict(OperationFailure):
    """Optimistic version check still failed after the allowed retries."""


class PoolTimeout(OperationFailure):
    """No connection could be acquired within the pool's acquire timeout."""


class SemaphoreTimeout(OperationFailure):
    """No in-flight permit could be acquired within its acquire timeout."""


class BreakerOpen(OperationFailure):
    """The circuit breaker refused the operation while it was open."""


class OperationTimeout(OperationFailure):
    """The operation ran past its deadline (server statement timeout or client)."""


class QueueFull(OperationFailure):
    """The group-commit queue stayed full past the operation's deadline."""


class ServerError(OperationFailure):
    """The database reported an error that is none of the kinds above."""


class TooManyConnections(ServerError):
    """The server refused a connection: its max_connections is exhausted."""
