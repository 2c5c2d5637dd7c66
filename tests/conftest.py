"""Fixtures shared by the whole suite, against real PostgreSQL and Redis.

gevent patches the standard library here, before anything imports psycopg, as in
a Locust process (see services.green). The servers come from DATABASE_URL and
REDIS_URL (`make test` sets both); a server that does not answer fails the suite,
it never skips it.
"""

from __future__ import annotations

from services import green

green.patch()

import os  # noqa: E402 - after the gevent patch, on purpose
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlsplit, urlunsplit  # noqa: E402

import psycopg  # noqa: E402
import pytest  # noqa: E402
import redis  # noqa: E402
from psycopg import sql  # noqa: E402

from services import cache, schema  # noqa: E402
from services.config import Profile, load_profile  # noqa: E402
from services.pool import Conn  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:54329/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:56379/0"


def _with_dbname(url: str, dbname: str) -> str:
    # Profiles take URLs, not key=value conninfo strings.
    return urlunsplit(urlsplit(url)._replace(path="/" + dbname))


@pytest.fixture(scope="session")
def server_url() -> str:
    """The server's URL; the suite fails here if it does not answer."""
    url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            level = conn.execute("SHOW wal_level").fetchone()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {url} does not answer: {exc}", pytrace=False)
    assert level is not None and level[0] == "logical", "wal_level must be logical"
    return url


@pytest.fixture(scope="session")
def db_url(server_url: str) -> Iterator[str]:
    """A database of the test session's own, dropped at the end."""
    name = f"cdc_load_test_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = _with_dbname(server_url, name)
    with psycopg.connect(url, autocommit=True) as conn:
        schema.create(conn)
    yield url
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            " WHERE database = %s AND NOT active",
            (name,),
        )
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)
            )
        )


@pytest.fixture
def conn(db_url: str) -> Iterator[Conn]:
    """An autocommit connection to an emptied event store."""
    with psycopg.connect(db_url, autocommit=True) as c:
        schema.reset(c)
        yield c


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis database of the session's own; the suite fails if Redis is down.

    The number is derived from the pid so that two suites on one server (a
    developer's and a helper's) rarely share a database; cache keys are not
    namespaced per run.
    """
    base = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    url = urlunsplit(urlsplit(base)._replace(path=f"/{1 + os.getpid() % 15}"))
    client = redis.Redis.from_url(url, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.fail(f"Redis at {url} does not answer: {exc}", pytrace=False)
    finally:
        client.close()
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session's Redis database, emptied of our keys."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    cache.forget(client)
    yield client
    client.close()


def make_profile(db_url: str, redis_url: str, **overrides: Any) -> Profile:
    """The optimized profile pointed at the test servers, with dotted overrides."""
    env = {"DATABASE_URL": db_url, "REDIS_URL": redis_url}
    return load_profile(
        ROOT / "configs" / "optimized.yaml", environ=env, overrides=overrides
    )


@pytest.fixture
def profile(db_url: str, redis_url: str) -> Profile:
    """The optimized profile on the test servers."""
    return make_profile(db_url, redis_url)


def unique(prefix: str) -> str:
    """A name no other test uses: for slots, publications and keys."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def cdc_load_connections(url: str, dbname: str | None = None) -> list[tuple[Any, ...]]:
    """Connections whose application_name starts with cdc-load, other than ours."""
    with psycopg.connect(url, autocommit=True, application_name="pytest") as c:
        query = (
            "SELECT application_name, state FROM pg_stat_activity"
            " WHERE application_name LIKE 'cdc-load%%' AND pid <> pg_backend_pid()"
        )
        params: tuple[Any, ...] = ()
        if dbname is not None:
            query += " AND datname = %s"
            params = (dbname,)
        return list(c.execute(query, params).fetchall())


@pytest.fixture
def stack(
    tmp_path: Path, conn: Conn, db_url: str, redis_client: Any, redis_url: str
) -> Iterator[Any]:
    """A pipeline of its own: slot, publication, consumer and Locust processes."""
    from tests.pipeline import Stack

    s = Stack(tmp_path, db_url, redis_url)
    yield s
    s.close()
