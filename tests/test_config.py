"""The profile loader: the two profiles, overrides, and every refusal."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cdc_users.users import TASKS
from services.config import (
    Profile,
    TaskWeights,
    load_profile,
    mask_url,
    parse_duration,
    resolved,
)
from services.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
OPTIMIZED = ROOT / "configs" / "optimized.yaml"
BASELINE = ROOT / "configs" / "baseline.yaml"


def load(env: dict[str, str] | None = None, path: Path = OPTIMIZED) -> Profile:
    return load_profile(path, environ=env or {})


def refused(env: dict[str, str], path: Path = OPTIMIZED) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, path)
    message = str(info.value)
    assert "\n" not in message
    return message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "profile.yaml"
    path.write_text(text)
    return path


def test_profiles_hold_the_before_and_after_values() -> None:
    before, after = load(path=BASELINE), load()
    pairs = [
        ("database.pool.max_size", 500, 100),
        ("database.pool.min_size", 100, 20),
        ("database.pool.acquire_timeout", 30.0, 10.0),
        ("database.pool.test_before_acquire", False, True),
        ("workload.target_ops", 5000, 1000),
        ("workload.users", 25, 10),
        ("workload.account_count", 500, 100),
        ("workload.channel_buffer_size", 5000, 1000),
        ("cache.ttl", 1800.0, 300.0),
        ("cache.max_size", 10000, 1000),
        ("cache.shard_count", 64, 16),
        ("cache.warmup_batch_size", 100, 50),
        ("event_store.pool.max_size", 200, 50),
        ("event_store.pool.min_size", 50, 10),
        ("event_store.batch_size", 10000, 1000),
        ("event_store.batch_processor_count", 32, 8),
        ("projection_store.pool.max_size", 100, 30),
        ("projection_store.pool.min_size", 20, 5),
        ("projection_store.batch_size", 5000, 1000),
        ("in_flight.permits", 50, 20),
        ("in_flight.acquire_timeout", None, 5.0),
        ("deadlines.write", 2.0, 2.0),
        ("deadlines.read", 1.0, 1.0),
        ("circuit_breaker.enabled", False, True),
        ("utilization_pause.enabled", False, True),
        ("utilization_pause.threshold", 0.8, 0.8),
        ("utilization_pause.pause", 1.0, 1.0),
        ("circuit_breaker.pause", 5.0, 5.0),
        ("redis.max_connections", 50, 50),
    ]
    for key, was, now in pairs:
        assert (get(before, key), get(after, key)) == (was, now), key


def get(profile: Any, key: str) -> Any:
    for part in key.split("."):
        profile = getattr(profile, part)
    return profile


def test_named_environment_overrides() -> None:
    profile = load(
        {
            "DATABASE_URL": "postgresql://u:pw@db:5432/x",
            "REDIS_URL": "redis://cache:6379/1",
            "DB_MAX_CONNECTIONS": "40",
            "DB_MIN_CONNECTIONS": "4",
            "REDIS_MAX_CONNECTIONS": "7",
            "DB_BATCH_SIZE": "123",
        }
    )
    assert profile.database.url == "postgresql://u:pw@db:5432/x"
    assert profile.redis.url == "redis://cache:6379/1"
    assert profile.database.pool.max_size == 40
    assert profile.database.pool.min_size == 4
    assert profile.redis.max_connections == 7
    assert profile.event_store.batch_size == 123


def test_prefixed_override_reaches_any_key() -> None:
    profile = load(
        {
            "CDC_WORKLOAD__USERS": "3",
            "CDC_DEADLINES__WRITE": "750ms",
            "CDC_CIRCUIT_BREAKER__ENABLED": "false",
            "CDC_IN_FLIGHT__ACQUIRE_TIMEOUT": "null",
            "CDC_PROFILE": "ignored: an option, not an override",
        }
    )
    assert profile.workload.users == 3
    assert profile.deadlines.write == 0.75
    assert profile.circuit_breaker.enabled is False
    assert profile.in_flight.acquire_timeout is None


def _leaf_keys(cls: Any, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        kind = (
            f.type
            if not isinstance(f.type, str)
            else eval(f.type, vars(sys.modules[cls.__module__]))
        )
        if dataclasses.is_dataclass(kind):
            keys += _leaf_keys(kind, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def test_every_key_can_be_overridden_from_the_environment() -> None:
    base = load()
    for key in _leaf_keys(Profile):
        if key == "name":
            continue
        value = get(base, key)
        if isinstance(value, bool):
            new: Any = not value
        elif isinstance(value, int):
            new = value + 1
        elif isinstance(value, float):
            new = value / 2
        elif key.endswith("write_path"):
            new = "batched" if value == "direct" else "direct"
        elif key.endswith("cdc.reader"):
            new = "sql" if value == "stream" else "stream"
        elif key.endswith(("slot_name", "publication_name")):
            new = value + "_x"
        elif value is None:
            new = 1.0
        else:
            new = value + "x"
        env = {
            "CDC_" + key.upper().replace(".", "__"): str(new).lower()
            if isinstance(new, bool)
            else str(new)
        }
        changed = load(env)
        assert get(changed, key) == new, key


def test_every_key_is_read_by_the_code() -> None:
    # A key nothing reads changes nothing: every leaf must be used outside config.
    code = "\n".join(
        p.read_text()
        for folder in ("services", "cdc_users")
        for p in (ROOT / folder).glob("*.py")
        if p.name != "config.py"
    )
    unused = [
        key
        for key in _leaf_keys(Profile)
        if not key.startswith("workload.weights.")
        and not re.search(r"\." + key.rsplit(".", 1)[-1] + r"\b", code)
    ]
    assert unused == []
    # The weights are read by name, one per task.
    assert set(TASKS) == {f.name for f in dataclasses.fields(TaskWeights)}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"DB_MAX_CONNECTIONS": "-5"},
            "database.pool.max_size (from DB_MAX_CONNECTIONS): -5",
        ),
        ({"DB_MAX_CONNECTIONS": "0"}, "expected a number greater than 0"),
        (
            {"DB_MIN_CONNECTIONS": "500"},
            "database.pool.min_size (from DB_MIN_CONNECTIONS): 500",
        ),
        (
            {"CDC_WORKLOAD__USERS": "ten"},
            "workload.users (from CDC_WORKLOAD__USERS): 'ten'",
        ),
        ({"CDC_WORKLOAD__USERS": "2.5"}, "expected a whole number"),
        ({"CDC_UTILIZATION_PAUSE__THRESHOLD": "1.5"}, "expected a ratio"),
        ({"CDC_THRESHOLDS__MAX_FAILURE_RATIO": "-0.1"}, "expected a ratio from 0 to 1"),
        ({"CDC_DEADLINES__WRITE": "two seconds"}, "expected a duration"),
        ({"CDC_DEADLINES__READ": "-1s"}, "deadlines.read"),
        ({"CDC_CIRCUIT_BREAKER__ENABLED": "maybe"}, "expected true or false"),
        (
            {"CDC_WORKLOAD__NOPE": "1"},
            "workload.nope (from CDC_WORKLOAD__NOPE): unknown key",
        ),
        ({"CDC_EVENT_STORE__WRITE_PATH": "sideways"}, "expected 'direct' or 'batched'"),
        ({"CDC_CACHE__SHARD_COUNT": "0"}, "cache.shard_count"),
        ({"DATABASE_URL": "not a url"}, "database.url (from DATABASE_URL)"),
        ({"CDC_DEADLINES__WRITE": "null"}, "null is not allowed"),
    ],
)
def test_bad_values_are_refused_in_one_line(env: dict[str, str], expected: str) -> None:
    assert expected in refused(env)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nbogus: 1\n", "bogus: unknown key"),
        ("- a list\n", "must be a mapping"),
        ("name: [unclosed\n", "not valid YAML at line"),
        ("name: x\n", "database: missing"),
    ],
)
def test_bad_files_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load(path=path)


def test_unknown_nested_key_in_file_names_its_path(tmp_path: Path) -> None:
    text = OPTIMIZED.read_text().replace("  max_connections: 50", "  max_conns: 50")
    with pytest.raises(ConfigError, match=r"^redis\.max_conns: unknown key"):
        load(path=write(tmp_path, text))


def test_durations() -> None:
    assert parse_duration("250ms", "k") == 0.25
    assert parse_duration("2s", "k") == 2.0
    assert parse_duration("1.5m", "k") == 90.0
    assert parse_duration(3, "k") == 3.0
    for bad in ("2 parsecs", "-1s", True, "s"):
        with pytest.raises(ConfigError):
            parse_duration(bad, "k")


def test_passwords_are_masked() -> None:
    assert mask_url("postgresql://u:secret@h:5/db") == "postgresql://u:***@h:5/db"
    assert mask_url("redis://:secret@h/0") == "redis://:***@h/0"
    assert mask_url("postgresql://h/db") == "postgresql://h/db"
    profile = load({"DATABASE_URL": "postgresql://u:secret@h/db"})
    assert "secret" not in str(resolved(profile))


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


def test_check_config_prints_resolved_values_masked() -> None:
    done = run_cli(
        "check-config",
        "--profile",
        str(OPTIMIZED),
        env={"DATABASE_URL": "postgresql://u:hunter2@h/db"},
    )
    assert done.returncode == 0, done.stderr
    assert '"max_size": 100' in done.stdout
    assert "hunter2" not in done.stdout + done.stderr
    assert "postgresql://u:***@h/db" in done.stdout


def test_check_config_refuses_a_bad_profile_with_one_line(tmp_path: Path) -> None:
    done = run_cli(
        "check-config", "--profile", str(OPTIMIZED), env={"DB_MIN_CONNECTIONS": "101"}
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert (
        "database.pool.min_size (from DB_MIN_CONNECTIONS): 101 is not allowed"
        in lines[0]
    )
    assert "Traceback" not in done.stderr

    missing = run_cli("check-config", "--profile", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("no such file")
