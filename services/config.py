"""Resource profiles: YAML files loaded into frozen, typed settings.

One loader, `load_profile`, reads a profile, applies environment overrides and checks
every value. A bad value is refused with a `ConfigError` whose message is one line
naming the key path, the value and what is allowed. Nothing else in the project
parses configuration.

Environment overrides, applied before validation:

- the names such teams already use: `DATABASE_URL`, `REDIS_URL`,
  `DB_MAX_CONNECTIONS`, `DB_MIN_CONNECTIONS`, `REDIS_MAX_CONNECTIONS`,
  `DB_BATCH_SIZE` (see `NAMED_OVERRIDES`);
- any other key as `CDC_` followed by its path in capitals with `__` between the
  levels: `CDC_WORKLOAD__USERS=5` sets `workload.users`. Variables that start with
  `CDC_` but have no `__` (such as `CDC_PROFILE`) are options, not overrides.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from services.errors import ConfigError

#: Where `locust -f locustfile.py` and the CLI look when no profile is named.
DEFAULT_PROFILE = "configs/optimized.yaml"

#: Idle time after which a pooled connection is checked before it is handed out, in
#: seconds. A check on every acquire cost about 20% of throughput here; a connection
#: used within the last few seconds is very unlikely to be broken.
IDLE_CHECK_AFTER_S = 5.0
#: Requests allowed to queue for a pooled connection before new ones fail at once.
MAX_WAITING = 0  # 0 means unbounded, as in psycopg_pool
#: Seconds a connection may live before the pool replaces it.
MAX_LIFETIME_S = 3600.0
#: Attempts of a command whose optimistic version check failed, first one included.
CONFLICT_ATTEMPTS = 5
#: Opening balance of each account created by setup, in minor units (cents).
OPENING_BALANCE = 1_000_000
#: Largest amount a generated deposit, withdrawal or transfer moves, in minor units.
MAX_AMOUNT = 5_000
#: Accounts inserted per statement while setting up, before the load starts.
SETUP_BATCH_SIZE = 500
#: Users started per second.
SPAWN_RATE = 100.0
#: Unconfirmed WAL past which the consumer warns that it is falling behind, bytes.
BACKLOG_WARN_BYTES = 64 * 1024 * 1024

NAMED_OVERRIDES: dict[str, str] = {
    "DATABASE_URL": "database.url",
    "REDIS_URL": "redis.url",
    "DB_MAX_CONNECTIONS": "database.pool.max_size",
    "DB_MIN_CONNECTIONS": "database.pool.min_size",
    "REDIS_MAX_CONNECTIONS": "redis.max_connections",
    "DB_BATCH_SIZE": "event_store.batch_size",
}
ENV_PREFIX = "CDC_"

# Field checks, named in `_spec`; each says what is allowed when it fails.
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "positive": (lambda v: v > 0, "a number greater than 0"),
    "non_negative": (lambda v: v >= 0, "a number of 0 or more"),
    "ratio": (lambda v: 0 <= v <= 1, "a ratio from 0 to 1"),
    "open_ratio": (lambda v: 0 < v < 1, "a ratio greater than 0 and less than 1"),
    "name": (
        lambda v: re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", v) is not None,
        "a lowercase SQL identifier (letters, digits, _)",
    ),
    "url": (lambda v: "://" in v, "a URL such as postgresql://host:5432/db"),
    "slot": (
        lambda v: re.fullmatch(r"cdc_load[a-z0-9_]{0,55}", v) is not None,
        "a name starting with cdc_load, then lowercase letters, digits or _",
    ),
}


def _spec(
    default: Any = dataclasses.MISSING,
    *,
    check: str | None = None,
    duration: bool = False,
) -> Any:
    """Declare a settings field: its default, its check, and whether it is a duration.

    Durations are written as `250ms`, `2s`, `1m` or a plain number of seconds, and are
    stored as float seconds.
    """
    meta = {"check": check, "duration": duration}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class PoolSettings:
    """A bounded connection pool."""

    min_size: int = _spec(check="non_negative")
    max_size: int = _spec(check="positive")
    acquire_timeout: float = _spec(10.0, check="positive", duration=True)
    max_waiting: int = _spec(MAX_WAITING, check="non_negative")
    test_before_acquire: bool = _spec(True)
    idle_check_after: float = _spec(
        IDLE_CHECK_AFTER_S, check="non_negative", duration=True
    )
    max_lifetime: float = _spec(MAX_LIFETIME_S, check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class DatabaseSettings:
    """The server and the pool the Locust users run their operations on."""

    url: str = _spec(check="url")
    pool: PoolSettings = _spec()


@dataclass(frozen=True, kw_only=True)
class EventStoreSettings:
    """The append-only event store and its group-commit writers."""

    write_path: Literal["direct", "batched"] = _spec("direct")
    pool: PoolSettings = _spec()
    batch_size: int = _spec(check="positive")
    batch_processor_count: int = _spec(check="positive")
    conflict_attempts: int = _spec(CONFLICT_ATTEMPTS, check="positive")


@dataclass(frozen=True, kw_only=True)
class ProjectionStoreSettings:
    """The CDC consumer's projection tables and their pool."""

    pool: PoolSettings = _spec()
    batch_size: int = _spec(check="positive")


@dataclass(frozen=True, kw_only=True)
class TaskWeights:
    """Relative weights of the Locust tasks; 0 disables a task."""

    deposit: int = _spec(3, check="non_negative")
    withdraw: int = _spec(2, check="non_negative")
    transfer: int = _spec(4, check="non_negative")
    balance: int = _spec(2, check="non_negative")
    open_account: int = _spec(0, check="non_negative")


@dataclass(frozen=True, kw_only=True)
class WorkloadSettings:
    """What the Locust users do and how much of it."""

    target_ops: int = _spec(check="positive")
    users: int = _spec(check="positive")
    account_count: int = _spec(check="positive")
    channel_buffer_size: int = _spec(check="positive")
    spawn_rate: float = _spec(SPAWN_RATE, check="positive")
    opening_balance: int = _spec(OPENING_BALANCE, check="positive")
    max_amount: int = _spec(MAX_AMOUNT, check="positive")
    setup_batch_size: int = _spec(SETUP_BATCH_SIZE, check="positive")
    #: Operations per second across all users; 0 runs them as fast as they go.
    target_rate: float = _spec(0.0, check="non_negative")
    weights: TaskWeights = _spec(TaskWeights())


@dataclass(frozen=True, kw_only=True)
class InFlightSettings:
    """A semaphore on database work: at most `permits` operations at once.

    Writes on the batched path are bounded by the group-commit queue instead.
    """

    permits: int = _spec(check="positive")
    # None waits for ever, which is what the baseline did.
    acquire_timeout: float | None = _spec(check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class DeadlineSettings:
    """How long one operation may take, enforced on the server and on the client."""

    write: float = _spec(check="positive", duration=True)
    read: float = _spec(check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """Pause all users after this many consecutive system failures."""

    enabled: bool = _spec()
    failure_threshold: int = _spec(20, check="positive")
    pause: float = _spec(5.0, check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class UtilizationPauseSettings:
    """Hold new operations while the pool is nearly exhausted."""

    enabled: bool = _spec()
    threshold: float = _spec(0.8, check="open_ratio")
    pause: float = _spec(1.0, check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """The Redis server behind the account cache."""

    url: str = _spec(check="url")
    max_connections: int = _spec(check="positive")


@dataclass(frozen=True, kw_only=True)
class CacheSettings:
    """The write-through account cache the CDC consumer keeps in Redis."""

    ttl: float = _spec(check="positive", duration=True)
    max_size: int = _spec(check="positive")
    shard_count: int = _spec(check="positive")
    warmup_batch_size: int = _spec(check="positive")


@dataclass(frozen=True, kw_only=True)
class CdcSettings:
    """The CDC consumer: its slot, how it reads, and what counts as late."""

    # Names start with cdc_load: a reset drops every slot of ours by that prefix.
    slot_name: str = _spec("cdc_load_slot", check="slot")
    publication_name: str = _spec("cdc_load_pub", check="slot")
    reader: Literal["stream", "sql"] = _spec("stream")
    #: A source transaction not applied within this is a failed propagation.
    max_lag: float = _spec(1.0, check="positive", duration=True)
    backlog_warn_bytes: int = _spec(BACKLOG_WARN_BYTES, check="positive")
    drain_timeout: float = _spec(60.0, check="positive", duration=True)
    status_interval: float = _spec(1.0, check="positive", duration=True)


@dataclass(frozen=True, kw_only=True)
class Thresholds:
    """Limits that decide the exit code of a headless run."""

    max_failure_ratio: float = _spec(check="ratio")
    max_p99_ms: float = _spec(check="positive")
    max_cdc_lag_p99_ms: float = _spec(check="positive")
    max_verification_violations: int = _spec(0, check="non_negative")


@dataclass(frozen=True, kw_only=True)
class Profile:
    """A whole resource profile."""

    name: str = _spec()
    database: DatabaseSettings = _spec()
    event_store: EventStoreSettings = _spec()
    projection_store: ProjectionStoreSettings = _spec()
    workload: WorkloadSettings = _spec()
    in_flight: InFlightSettings = _spec()
    deadlines: DeadlineSettings = _spec()
    circuit_breaker: BreakerSettings = _spec()
    utilization_pause: UtilizationPauseSettings = _spec()
    redis: RedisSettings = _spec()
    cache: CacheSettings = _spec()
    cdc: CdcSettings = _spec(CdcSettings())
    thresholds: Thresholds = _spec()
    #: Where the profile was read from; not a key of the file.
    source: str = field(default="", compare=False)


def load_profile(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Profile:
    """Read a profile, apply environment and explicit overrides, and validate it.

    `overrides` maps dotted key paths to values and wins over the environment; the
    Locust options use it. Raise `ConfigError` with a one-line message on any
    problem: a missing or unreadable file, YAML that is not a mapping, an unknown
    key, a wrong type, a value out of range, or pool sizes with min above max.
    """
    text = _read(Path(path))
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the profile must be a mapping of keys")

    env = os.environ if environ is None else environ
    origins: dict[str, str] = {}
    for key, value, origin in _env_overrides(env):
        _set_path(raw, key, value, origin)
        origins[key] = origin
    for key, value in (overrides or {}).items():
        _set_path(raw, key, value, "option")
        origins[key] = "option"

    try:
        profile: Profile = _build(Profile, raw, "", ignore={"source"})
        _check_cross(profile)
    except ConfigError as exc:
        # Say where a bad value came from when it was not the file.
        key, sep, rest = str(exc).partition(": ")
        if sep and key in origins:
            raise ConfigError(f"{key} (from {origins[key]}): {rest}") from None
        raise
    return dataclasses.replace(profile, source=str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"profile {path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"profile {path}: cannot read it ({exc.strerror})") from None


def _env_overrides(env: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    found: list[tuple[str, Any, str]] = []
    for name, key in NAMED_OVERRIDES.items():
        if name in env:
            found.append((key, _env_value(env[name]), name))
    for name, text in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name[len(ENV_PREFIX) :]:
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            found.append((key, _env_value(text), name))
    return found


def _env_value(text: str) -> Any:
    # YAML rules, so that "5" is a number and "true" a boolean, as in the file.
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _set_path(raw: dict[str, Any], key: str, value: Any, origin: str) -> None:
    parts = key.split(".")
    node: Any = raw
    cls: Any = Profile
    for depth, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints or part == "source":
            where = ".".join(parts[: depth + 1])
            allowed = ", ".join(sorted(h for h in hints if h != "source"))
            raise ConfigError(
                f"{where} (from {origin}): unknown key; allowed: {allowed}"
            )
        cls = hints[part]
        if depth == len(parts) - 1:
            node[part] = value
            return
        if not dataclasses.is_dataclass(cls):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{where} (from {origin}): is a value, not a section")
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: must be a mapping")
        node = child


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type, data: Any, path: str, ignore: set[str] | None = None) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path or 'profile'}: {data!r} is not allowed; expected a mapping"
        )
    hints = _hints(cls)
    fields = {
        f.name: f for f in dataclasses.fields(cls) if f.name not in (ignore or ())
    }
    for key in data:
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"{_join(path, str(key))}: unknown key; allowed: {allowed}"
            )

    values: dict[str, Any] = {}
    for name, fld in fields.items():
        where = _join(path, name)
        if name not in data:
            if fld.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing; this key is required")
            continue
        values[name] = _convert(hints[name], data[name], where, fld.metadata)
    return cls(**values)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(kind: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    optional = False
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional, kind = True, args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: null is not allowed; a value is required")

    if dataclasses.is_dataclass(kind):
        return _build(typing.cast(type, kind), value, where)
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            allowed = " or ".join(repr(c) for c in choices)
            raise ConfigError(f"{where}: {value!r} is not allowed; expected {allowed}")
        return value

    if meta.get("duration"):
        result: Any = parse_duration(value, where)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(
                f"{where}: {value!r} is not allowed; expected true or false"
            )
        result = value
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(
                f"{where}: {value!r} is not allowed; expected a whole number"
            )
        result = value
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: {value!r} is not allowed; expected a number")
        result = float(value)
    elif kind is str:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: {value!r} is not allowed; expected a string")
        result = value
    else:  # pragma: no cover - a settings class with a type the loader lacks
        raise TypeError(f"no conversion for {kind!r} at {where}")

    check = meta.get("check")
    if check:
        test, allowed = _CHECKS[check]
        if not test(result):
            shown = mask_url(value) if check == "url" else value
            raise ConfigError(f"{where}: {shown!r} is not allowed; expected {allowed}")
    return result


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any, where: str) -> float:
    """Return `value` in seconds: `250ms`, `2s`, `1.5m`, `1h` or a plain number."""
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        if value >= 0:
            return float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_S[match.group(2)]
    raise ConfigError(
        f"{where}: {value!r} is not allowed; expected a duration such as 250ms, 2s, "
        "1m or a number of seconds"
    )


def _check_cross(profile: Profile) -> None:
    pools = {
        "database.pool": profile.database.pool,
        "event_store.pool": profile.event_store.pool,
        "projection_store.pool": profile.projection_store.pool,
    }
    for where, pool in pools.items():
        if pool.min_size > pool.max_size:
            raise ConfigError(
                f"{where}.min_size: {pool.min_size} is not allowed; expected at most "
                f"{where}.max_size ({pool.max_size})"
            )
    weights = profile.workload.weights
    if sum(dataclasses.astuple(weights)) == 0:
        raise ConfigError(
            "workload.weights: all 0 is not allowed; give a task a weight"
        )


def mask_url(url: str) -> str:
    """Return `url` with any password replaced by `***`, for logs and reports."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def resolved(profile: Profile) -> dict[str, Any]:
    """Return the profile as a nested dict, passwords masked, for printing."""
    data = dataclasses.asdict(profile)
    data["database"]["url"] = mask_url(profile.database.url)
    data["redis"]["url"] = mask_url(profile.redis.url)
    return data
