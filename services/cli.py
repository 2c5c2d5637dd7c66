"""`cdc-load`: the command line for everything that is not Locust itself.

Exit codes: 0 success, 1 a check failed (verification, thresholds), 2 bad input or
a server that cannot be used. A user's mistake prints one line, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from services import logs
from services.config import DEFAULT_PROFILE, Profile, load_profile, resolved
from services.errors import CdcLoadError

logger = logs.get("cli")


def _profile(args: argparse.Namespace) -> Profile:
    return load_profile(args.profile)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate a profile and print its resolved values, passwords masked."""
    profile = _profile(args)
    print(json.dumps(resolved(profile), indent=2))
    print(f"profile {profile.name} from {profile.source}: valid", file=sys.stderr)
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    """Create the schema and the profile's accounts; with --reset, empty it first."""
    from services import setup

    profile = _profile(args)
    setup.prepare(profile, reset=args.reset)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    """Empty the event store and drop this project's replication slots."""
    from services import schema, setup

    profile = _profile(args)
    with setup.connect(profile.database.url, "reset") as conn:
        schema.reset(conn)
    setup.forget_cache(profile)
    return 0


def cmd_consumer(args: argparse.Namespace) -> int:
    """Run the CDC consumer until SIGINT or SIGTERM; resume from its checkpoint."""
    import os
    import signal
    import threading
    from pathlib import Path

    from services.consumer import Consumer

    profile = _profile(args)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("signal %s: stopping after the current batch", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    consumer = Consumer(profile, process=str(os.getpid()))
    consumer.start()
    if args.ready_file:
        Path(args.ready_file).write_text(f"{os.getpid()}\n")
    consumer.run(stop)
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    """Wait until the consumer has applied everything committed so far."""
    from services.consumer import drain

    profile = _profile(args)
    drain(profile, timeout_s=args.timeout)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify projections and cache against the event store; exit 1 on a violation.

    Prints a table and writes the report as JSON. Run it on a drained system: after
    a run, or with --drain while the consumer is running.
    """
    from pathlib import Path

    from services import consumer, endtoend, verify

    profile = _profile(args)
    if args.drain:
        consumer.drain(profile)
    report = endtoend.run_verification(profile, report_path=Path(args.report))
    for line in verify.render(report):
        print(line)
    print(f"report written to {args.report}", file=sys.stderr)
    return 0 if report.passed else 1


def cmd_preflight(args: argparse.Namespace) -> int:
    """Check the server for this profile: logical decoding, slot, connections."""
    from services import preflight, setup

    profile = _profile(args)
    with setup.connect(profile.database.url, "preflight") as conn:
        findings, _plan = preflight.inspect(conn, profile, workers=args.workers)
        for finding in findings:
            print(
                f"{'ok' if finding.ok else 'NO':<3} {finding.name:<12} {finding.detail}"
            )
        preflight.check(
            conn, profile, workers=args.workers, allow_overcommit=args.allow_overcommit
        )
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "check-config": (cmd_check_config, "validate a profile and print it resolved"),
    "setup": (cmd_setup, "create the schema and the accounts"),
    "reset": (cmd_reset, "empty the event store and forget our slots"),
    "consumer": (cmd_consumer, "run the CDC consumer"),
    "drain": (cmd_drain, "wait until the consumer has caught up"),
    "verify": (cmd_verify, "check projections and cache against the event store"),
    "preflight": (cmd_preflight, "check the server can take this profile"),
}


def parser() -> argparse.ArgumentParser:
    """Build the argument parser of every sub-command."""
    top = argparse.ArgumentParser(prog="cdc-load", description=__doc__)
    top.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")
    subs = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (func, help_text) in COMMANDS.items():
        sub = subs.add_parser(name, help=help_text, description=func.__doc__)
        sub.add_argument(
            "--profile",
            default=DEFAULT_PROFILE,
            help=f"profile YAML (default {DEFAULT_PROFILE})",
        )
        if name == "setup":
            sub.add_argument("--reset", action="store_true", help="empty it first")
        if name == "consumer":
            sub.add_argument("--ready-file", help="write the pid here once started")
        if name == "verify":
            sub.add_argument(
                "--drain", action="store_true", help="wait for the consumer first"
            )
            sub.add_argument(
                "--report",
                default="reports/verification.json",
                help="where to write the JSON report",
            )
        if name == "preflight":
            sub.add_argument(
                "--workers", type=int, default=1, help="Locust worker processes"
            )
            sub.add_argument(
                "--allow-overcommit",
                action="store_true",
                help="report a profile that does not fit, but do not refuse it",
            )
        if name == "drain":
            sub.add_argument(
                "--timeout", type=float, help="seconds (default: cdc.drain_timeout)"
            )
        sub.set_defaults(func=func)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run a sub-command and return its exit code."""
    args = parser().parse_args(argv)
    logs.configure(args.log_level)
    try:
        return int(args.func(args))
    except CdcLoadError as exc:
        print(f"cdc-load: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
