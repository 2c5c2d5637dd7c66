"""Getting a database ready for a run: schema, optional reset, accounts.

Runs once per test, before any load, in the process that owns the test (the CLI,
the local runner or the master), on a short-lived connection of its own.
"""

from __future__ import annotations

import psycopg
import redis

from services import cache, logs, schema
from services.config import Profile, mask_url
from services.errors import ServiceUnavailable
from services.eventstore import create_accounts, existing_accounts
from services.pool import Conn, application_name

logger = logs.get("setup")


def connect(url: str, role: str) -> Conn:
    """Open one autocommit connection named after `role`.

    Raise `ServiceUnavailable` with the masked URL if the server does not answer.
    """
    try:
        return psycopg.connect(
            url, autocommit=True, application_name=application_name(role)
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "no answer"
        raise ServiceUnavailable(
            f"cannot connect to {mask_url(url)}: {reason}"
        ) from exc


def prepare(profile: Profile, *, reset: bool = False) -> list[int]:
    """Create the schema, reset it if asked, and open missing accounts.

    Return the ids of the `account_count` accounts the users share. Accounts are
    opened in batches of `workload.setup_batch_size`, with progress in the log.
    """
    wanted = profile.workload.account_count
    with connect(profile.database.url, "setup") as conn:
        schema.create(conn)
        if reset:
            schema.reset(conn)
            forget_cache(profile)
        have = existing_accounts(conn, wanted)
        missing = wanted - len(have)
        if missing > 0:
            logger.info("opening %s accounts (%s exist)", missing, len(have))

            def progress(done: int, total: int) -> None:
                logger.info("accounts opened: %s of %s", done, total)

            create_accounts(
                conn,
                missing,
                profile.workload.opening_balance,
                batch_size=profile.workload.setup_batch_size,
                progress=progress,
            )
            have = existing_accounts(conn, wanted)
    logger.info("%s accounts ready", len(have))
    return have


def forget_cache(profile: Profile) -> None:
    """Delete our keys in Redis, so a new run starts with an empty cache.

    Raise `ServiceUnavailable` if Redis does not answer.
    """
    client = cache.client(profile.redis.url, max_connections=1)
    try:
        deleted = cache.forget(client)
    except redis.RedisError as exc:
        raise ServiceUnavailable(
            f"cannot reach Redis at {mask_url(profile.redis.url)}: {exc}"
        ) from exc
    finally:
        client.close()
    logger.info("deleted %s keys of ours in Redis", deleted)
