"""Locust event hooks: options, setup, the gates, the budget, the summary.

`register()` is called once from the locustfile. Listeners that read or drive the
gates are added in `init`, which Locust fires after the runner has added its own
stats listener to `request`: so when ours runs, the operation is already in the
stats, and a quit triggered by the last operation sees it counted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import gevent
import psycopg
import redis
from locust import events
from locust import stats as locust_stats
from locust.env import Environment
from locust.runners import LocalRunner, MasterRunner, Runner, WorkerRunner

from cdc_users import summary, webui
from cdc_users.cdcfeed import CdcFeed
from cdc_users.harness import Harness
from services import budget, consumer, endtoend, logs, preflight, setup
from services.config import DEFAULT_PROFILE, Profile, load_profile
from services.errors import BreakerOpen, CdcLoadError, ConfigError, OperationFailure

logger = logs.get("locust")

#: Request type of account operations answered by PostgreSQL, and by the cache.
REQUEST_TYPE = "PG"
CACHE_REQUEST_TYPE = "REDIS"
#: What counts as an operation: the budget, the breaker and the pause see these.
OPERATION_TYPES = frozenset({REQUEST_TYPE, CACHE_REQUEST_TYPE})
#: Stop timeout given to Locust when none was asked for: an operation may wait for
#: a permit and a connection, then run to its deadline, before its user stops.
MAX_STOP_TIMEOUT_S = 30.0


@dataclasses.dataclass
class _State:
    """The process's profile and its current harness."""

    profile: Profile | None = None
    harness: Harness | None = None
    feed: CdcFeed | None = None
    environment: Environment | None = None
    headless: bool = True
    #: Drain and verification of the last test, once done (local or master).
    end: dict[str, Any] | None = None
    #: This process's share of the test, as the master sent it (workers).
    plan: dict[str, int] | None = None
    #: Workers that were sent a share, and those that finished it (master).
    planned: set[str] = dataclasses.field(default_factory=set)
    finished: set[str] = dataclasses.field(default_factory=set)
    #: Peak of cdc-load connections seen in pg_stat_activity during the test.
    peak_connections: int = 0
    peak_pool_connections: int = 0
    sampler: Any = None
    sampling: bool = False
    #: What the UI keeps showing once the test's feed has stopped.
    last_status: dict[str, str] = dataclasses.field(default_factory=dict)
    last_history: list[dict[str, float]] = dataclasses.field(default_factory=list)


STATE = _State()


def current() -> Harness:
    """Return the harness of the test that is running in this process."""
    if STATE.harness is None:
        raise CdcLoadError("no test is running in this process")
    return STATE.harness


def register() -> None:
    """Attach the project's listeners to Locust's events."""
    events.init_command_line_parser.add_listener(_add_options)
    events.init.add_listener(_on_init)


def _add_options(parser: Any) -> None:
    group = parser
    group.add_argument(
        "--cdc-profile",
        default=DEFAULT_PROFILE,
        env_var="CDC_PROFILE",
        help="Resource profile (YAML) to run; see configs/",
    )
    group.add_argument(
        "--cdc-accounts",
        type=int,
        default=0,
        env_var="CDC_ACCOUNTS",
        help="Accounts to share across users (0: the profile's account_count)",
    )
    group.add_argument(
        "--cdc-target-ops",
        type=int,
        default=0,
        env_var="CDC_TARGET_OPS",
        help="Operations in total before the test stops (0: the profile's target_ops)",
    )
    group.add_argument(
        "--cdc-skip-verify",
        action="store_true",
        default=False,
        env_var="CDC_SKIP_VERIFY",
        help="Workload only: no CDC feed, no drain, no verification (verdict: skipped)",
    )
    group.add_argument(
        "--cdc-allow-overcommit",
        action="store_true",
        default=False,
        env_var="CDC_ALLOW_OVERCOMMIT",
        help="Run a profile whose pools do not fit the server, to reproduce exhaustion",
    )
    group.add_argument(
        "--cdc-summary",
        default="",
        env_var="CDC_SUMMARY",
        help="Write the run's summary as JSON to this file",
        include_in_web_ui=False,
    )


def load(options: Any) -> Profile:
    """Load the profile the options name, with the options' overrides on top.

    Raise `ConfigError` for a bad profile or option.
    """
    overrides: dict[str, Any] = {}
    for attr, key in (
        ("cdc_accounts", "workload.account_count"),
        ("cdc_target_ops", "workload.target_ops"),
    ):
        value = getattr(options, attr, 0)
        if value:
            overrides[key] = value
    return load_profile(
        getattr(options, "cdc_profile", DEFAULT_PROFILE), overrides=overrides
    )


def _on_init(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    try:
        profile = load(options)
    except ConfigError as exc:
        # A user's mistake: one line and exit 2, before anything is written.
        sys.stderr.write(f"cdc-load: {exc}\n")
        _remove_empty_csv(options)
        sys.exit(2)
    STATE.profile = profile
    STATE.environment = environment
    STATE.headless = bool(getattr(options, "headless", True))

    from cdc_users import users

    if options is not None:
        if getattr(options, "num_users", None) is None:
            options.num_users = profile.workload.users
        if not _given("-r", "--spawn-rate", "LOCUST_SPAWN_RATE"):
            options.spawn_rate = profile.workload.spawn_rate
    users.configure(
        profile.workload.weights,
        target_rate=profile.workload.target_rate,
        users=getattr(options, "num_users", None) or profile.workload.users,
    )
    if not environment.stop_timeout:
        # Locust kills users mid-query at stop by default; give them time to finish.
        environment.stop_timeout = min(MAX_STOP_TIMEOUT_S, _longest_operation(profile))

    runner = environment.runner
    if isinstance(runner, LocalRunner) and STATE.headless:
        # Refuse a profile that cannot fit before anything is written.
        try:
            _preflight(environment, profile, workers=1)
        except CdcLoadError as exc:
            sys.stderr.write(f"cdc-load: {exc}\n")
            _remove_empty_csv(options)
            sys.exit(2)
    if isinstance(runner, WorkerRunner):
        runner.register_message("cdc_plan", _on_plan)
        events.report_to_master.add_listener(_on_report_to_master)
    if isinstance(runner, MasterRunner):
        runner.register_message("cdc_done", _on_worker_done)
        events.worker_report.add_listener(_on_worker_report)

    webui.install(environment, _ui_state)
    events.request.add_listener(_on_request)
    events.test_start.add_listener(_on_test_start)
    events.test_stop.add_listener(_on_test_stop)
    events.quitting.add_listener(_on_quitting)
    logger.info(
        "profile %s from %s: %s users, %s accounts, target %s operations, %s path",
        profile.name,
        profile.source,
        getattr(options, "num_users", profile.workload.users),
        profile.workload.account_count,
        profile.workload.target_ops,
        profile.event_store.write_path,
    )


def _remove_empty_csv(options: Any) -> None:
    # Locust opens its CSV files before init; with no run they hold only headers.
    prefix = getattr(options, "csv_prefix", None)
    if not prefix:
        return
    for suffix in (
        "_stats.csv",
        "_stats_history.csv",
        "_failures.csv",
        "_exceptions.csv",
    ):
        path = Path(prefix + suffix)
        if path.is_file() and path.read_text().count("\n") <= 1:
            path.unlink()


def _given(short: str, long: str, env: str) -> bool:
    argv = sys.argv[1:]
    return env in os.environ or any(
        a in (short, long) or a.startswith(long + "=") for a in argv
    )


def _longest_operation(profile: Profile) -> float:
    permit = profile.in_flight.acquire_timeout or MAX_STOP_TIMEOUT_S
    return permit + profile.database.pool.acquire_timeout + profile.deadlines.write + 1


def _process_name(runner: Runner | None) -> str:
    if isinstance(runner, WorkerRunner):
        return f"w{runner.worker_index}-{os.getpid()}"
    return str(os.getpid())


def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    try:
        profile = load(environment.parsed_options)
    except ConfigError as exc:
        logger.error("%s", exc)
        _stop(environment)
        return
    STATE.profile = profile
    STATE.end = None
    try:
        if not isinstance(runner, WorkerRunner):
            workers = _workers(runner)
            _preflight(environment, profile, workers=len(workers) or 1)
            setup.prepare(profile)
            if not _skip_verify(environment):
                _wait_for_projections(profile)
                STATE.feed = CdcFeed(environment, profile)
                STATE.feed.start()
            STATE.peak_connections = STATE.peak_pool_connections = 0
            STATE.sampling = True
            STATE.sampler = gevent.spawn(_sample_connections, profile)
        if isinstance(runner, MasterRunner):
            _send_plans(runner, profile)
            return
        plan = STATE.plan if isinstance(runner, WorkerRunner) else None
        if isinstance(runner, WorkerRunner) and plan is None:
            raise CdcLoadError("no share of the test came from the master")
        parts = plan["workers"] if plan else 1
        harness = Harness(
            budget.per_process(profile, parts),
            budget=plan["budget"] if plan else profile.workload.target_ops,
            process=_process_name(runner),
            overcommit=_allow_overcommit(environment),
        )
        harness.budget.on_done = lambda: gevent.spawn(_finish, environment)
        harness.start()
    except CdcLoadError as exc:
        logger.error("cannot start the test: %s", exc)
        environment.process_exit_code = 2
        _stop(environment)
        return
    STATE.harness = harness
    logger.info(
        "test started: %s accounts, budget %s operations",
        len(harness.accounts),
        harness.budget.limit,
    )


def _wait_for_projections(profile: Profile) -> None:
    # The accounts just opened reach the projections before the load starts, so
    # the first balance reads find them and the first lags are the workload's.
    try:
        consumer.drain(profile, timeout_s=min(10.0, profile.cdc.drain_timeout))
    except (CdcLoadError, redis.RedisError) as exc:
        logger.warning("starting without the consumer caught up: %s", exc)


def _finish(environment: Environment) -> None:
    harness = current()
    logger.info("target of %s operations reached", harness.budget.limit)
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # The master ends the test once every worker has done its share.
        runner.send_message("cdc_done", _counters(harness))
        return
    _stop(environment)


def _workers(runner: Runner | None) -> list[str]:
    if not isinstance(runner, MasterRunner):
        return []
    nodes = runner.clients.ready + runner.clients.running + runner.clients.spawning
    return sorted(node.id for node in nodes)


def _send_plans(runner: MasterRunner, profile: Profile) -> None:
    workers = _workers(runner)
    STATE.planned = set(workers)
    STATE.finished = set()
    total = profile.workload.target_ops
    for index, worker in enumerate(workers):
        share = budget.share(total, index, len(workers))
        runner.send_message(
            "cdc_plan",
            {"workers": len(workers), "index": index, "budget": share},
            client_id=worker,
        )
    logger.info("split %s operations over %s workers", total, len(workers))


def _on_plan(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    STATE.plan = dict(msg.data)
    logger.info(
        "share of this worker: %s operations, 1/%s of the pools",
        STATE.plan["budget"],
        STATE.plan["workers"],
    )


def _on_worker_done(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    summary.WORKER_COUNTERS[msg.node_id] = msg.data
    STATE.finished.add(msg.node_id)
    if STATE.planned and STATE.finished >= STATE.planned:
        logger.info("every worker finished its share")
        gevent.spawn(_stop, environment)


def _counters(harness: Harness) -> dict[str, Any]:
    return dataclasses.asdict(harness.snapshot())


def _on_report_to_master(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    if STATE.harness is not None:
        data["cdc_counters"] = _counters(STATE.harness)


def _on_worker_report(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    counters = data.get("cdc_counters")
    if counters is not None:
        summary.WORKER_COUNTERS[client_id] = counters


def _allow_overcommit(environment: Environment) -> bool:
    return bool(getattr(environment.parsed_options, "cdc_allow_overcommit", False))


def _preflight(environment: Environment, profile: Profile, *, workers: int) -> None:
    with setup.connect(profile.database.url, "preflight") as conn:
        preflight.check(
            conn,
            profile,
            workers=workers,
            allow_overcommit=_allow_overcommit(environment),
        )


#: Seconds between samples of pg_stat_activity for the peak connection count.
SAMPLE_INTERVAL_S = 0.25
#: Every connection of ours to this database, and those of the Locust processes'
#: pools alone.
SQL_CONNECTIONS = """
SELECT count(*),
       count(*) FILTER (WHERE application_name LIKE 'cdc-load-users-%%'
                           OR application_name LIKE 'cdc-load-writers-%%')
FROM pg_stat_activity
WHERE application_name LIKE 'cdc-load%%' AND datname = current_database()
"""


def _sample_connections(profile: Profile) -> None:
    try:
        with setup.connect(profile.database.url, "sampler") as conn:
            while STATE.sampling:
                row = conn.execute(SQL_CONNECTIONS).fetchone()
                if row is not None:
                    STATE.peak_connections = max(STATE.peak_connections, int(row[0]))
                    STATE.peak_pool_connections = max(
                        STATE.peak_pool_connections, int(row[1])
                    )
                gevent.sleep(SAMPLE_INTERVAL_S)
    except (psycopg.Error, CdcLoadError) as exc:
        logger.warning("stopped sampling connections: %s", exc)


def _ui_state() -> dict[str, Any]:
    feed = STATE.feed
    return {
        "status": feed.status if feed else STATE.last_status,
        "history": feed.history if feed else STATE.last_history,
        "processes": summary.process_counters(STATE.harness),
        "peak_connections": STATE.peak_connections,
        "end": STATE.end,
    }


def _stop(environment: Environment) -> None:
    runner = environment.runner
    if runner is None:
        return
    # runner.quit() from inside a user's task never completes: this runs in a
    # greenlet of its own (spawned by the caller).
    if STATE.headless:
        runner.quit()
    else:
        runner.stop()


def _on_request(
    request_type: str, exception: BaseException | None = None, **_kwargs: Any
) -> None:
    if request_type not in OPERATION_TYPES:
        return
    harness = STATE.harness
    if harness is None:
        return
    if not isinstance(exception, BreakerOpen):
        system_failure = exception is not None and not (
            isinstance(exception, OperationFailure) and exception.business
        )
        harness.breaker.record(system_failure)
    harness.pause.observe(harness.utilization())
    harness.budget.finish()


def _skip_verify(environment: Environment) -> bool:
    return bool(getattr(environment.parsed_options, "cdc_skip_verify", False))


def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    harness = STATE.harness
    if harness is not None:
        harness.close()
    if isinstance(environment.runner, WorkerRunner) or STATE.profile is None:
        return
    if STATE.sampler is not None:
        # Let it finish its query: a greenlet killed mid-query leaves psycopg a
        # busy connection to roll back ("another command is already in progress").
        STATE.sampling = False
        STATE.sampler.join(timeout=5)
        STATE.sampler.kill(block=True)
        STATE.sampler = None
    if not STATE.headless:
        if STATE.feed is not None:
            gevent.spawn(_end_of_test, environment)
        return
    # Before Locust writes its HTML report and prints its stats, so the CDC rows of
    # the drain are in both.
    if STATE.feed is not None and STATE.end is None:
        _end_of_test(environment)
    if getattr(environment.parsed_options, "csv_prefix", None):
        # Locust's CSV writer writes once per interval and not at exit: wait one
        # interval, with nothing left to run, so the files get the final numbers.
        gevent.sleep(locust_stats.CSV_STATS_INTERVAL_SEC + 0.1)


def _end_of_test(environment: Environment) -> None:
    profile, feed = STATE.profile, STATE.feed
    assert profile is not None and feed is not None
    logger.info("waiting for the CDC consumer to apply everything committed")
    STATE.end = endtoend.drain_and_verify(profile)
    if not feed.catch_up():
        logger.warning("the lag stream was not read to its end")
    STATE.last_status, STATE.last_history = feed.status, feed.history
    feed.stop()
    STATE.feed = None


def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner) or STATE.profile is None:
        return
    harness = STATE.harness
    if harness is not None:
        harness.close()
    if not isinstance(runner, LocalRunner | MasterRunner):
        return
    report = summary.build(
        environment,
        STATE.profile,
        harness,
        end=STATE.end,
        verified=not _skip_verify(environment),
        peak_connections=(STATE.peak_connections, STATE.peak_pool_connections),
    )
    for line in summary.render(report):
        print(line, flush=True)
    target = getattr(environment.parsed_options, "cdc_summary", "")
    if target:
        path = Path(target)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if not environment.process_exit_code:
        # Set either way: Locust on its own exits 1 for any failed request, and
        # expected rejections (an overdraft) are within the thresholds.
        environment.process_exit_code = 0 if report["passed"] else 1
