"""The helper database of the capture tests and of scripts/measure_capture.py.

`cdc_helper_a` holds a bare `events` table: the event store's columns without its
constraints, trigger or `txid`, so that the pgoutput fixtures under tests/data/
keep their column layout whatever the real schema gains, and the decoder and
reader tests can write rows the event store would refuse.
"""

from __future__ import annotations

import contextlib
import os

import psycopg
from psycopg import conninfo, sql

DEFAULT_SERVER_URL = "postgresql://postgres@127.0.0.1:54329/postgres"
DATABASE = "cdc_helper_a"
EVENTS_DDL = """
CREATE TABLE IF NOT EXISTS events (
  position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  account_id bigint NOT NULL,
  version integer NOT NULL,
  event_type text NOT NULL,
  delta bigint NOT NULL,
  transaction_id uuid NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  UNIQUE (account_id, version)
)
"""


def ensure(server: str | None = None) -> str:
    """Create the helper database and its events table if missing; return its URL.

    `server` defaults to DATABASE_URL, then to the private server of
    scripts/services.sh.
    """
    server = server or os.environ.get("DATABASE_URL", DEFAULT_SERVER_URL)
    with psycopg.connect(server, autocommit=True) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
        ).fetchone()
        if found is None:
            # Another session may create it between the check and here.
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(
                    sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE))
                )
    url = conninfo.make_conninfo(server, dbname=DATABASE)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(EVENTS_DDL)
    return url
