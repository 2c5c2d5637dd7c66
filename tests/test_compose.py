"""docker-compose.yml, the Dockerfile and .dockerignore, held against the project.

No Docker engine runs here, so nothing is built or started. The files are parsed
and everything they name is checked where it is defined: Locust's options by the
project's own Locust parser, the `cdc-load` sub-commands by `services.cli`, the
profiles by `load_profile`, the programs by pyproject.toml. A rename in any of
those fails here rather than at `docker compose up`.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services import budget, cli, verify
from services.config import DEFAULT_PROFILE, Profile, load_profile, resolved
from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
#: The services built from this repository; they all run the same image.
APP_SERVICES = ("consumer", "master", "worker")
#: Ports Locust uses when none is given: the web UI, and the master's for workers.
WEB_PORT = 8089
MASTER_PORT = 5557
#: PostgreSQL's superuser_reserved_connections when the server is not told.
DEFAULT_RESERVED_CONNECTIONS = 3
#: Worker counts the compose file is said to run with (`--scale worker=4`).
WORKER_COUNTS = (1, 4)
#: Service attributes of the Compose specification this file may use. Compose
#: refuses any other key; with no Compose here, this list stands in for its schema.
SERVICE_KEYS = frozenset(
    {
        "build",
        "cap_add",
        "cap_drop",
        "command",
        "container_name",
        "cpus",
        "depends_on",
        "deploy",
        "entrypoint",
        "env_file",
        "environment",
        "expose",
        "extra_hosts",
        "healthcheck",
        "hostname",
        "image",
        "init",
        "labels",
        "logging",
        "mem_limit",
        "network_mode",
        "networks",
        "platform",
        "ports",
        "profiles",
        "pull_policy",
        "read_only",
        "restart",
        "security_opt",
        "shm_size",
        "stop_grace_period",
        "stop_signal",
        "sysctls",
        "tmpfs",
        "ulimits",
        "user",
        "volumes",
        "working_dir",
    }
)
TOP_LEVEL_KEYS = frozenset({"name", "services", "volumes", "networks", "configs"})

# Compose's interpolation: $$, ${NAME}, ${NAME:-default}, ${NAME-default}, $NAME.
# The empty alternative catches any other $, which Compose refuses.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>[^}$]*))?\}"
    r"|(?P<plain>[A-Za-z_]\w*)"
    r"|(?P<invalid>))"
)


# Reading the files.


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Substitute variables as Compose does; refuse what it would refuse or warn on.

    A variable with no default that the environment lacks is an error here: Compose
    only warns and puts an empty string in its place.
    """

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["braced"] or match["plain"]
        if name is None:
            raise ValueError(f"{text!r}: a $ Compose cannot read (write $$ for $)")
        value = environ.get(name)
        if match["op"] == ":-":
            return value or match["default"]
        if match["op"] == "-":
            return match["default"] if value is None else value
        if value is None:
            raise ValueError(f"{text!r}: ${name} is unset and has no default")
        return value

    return _VARIABLE.sub(one, text)


def _resolve(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, list):
        return [_resolve(item, environ) for item in node]
    if isinstance(node, dict):
        return {key: _resolve(value, environ) for key, value in node.items()}
    return node


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice is an error, as in Compose.

    PyYAML keeps the last of two equal keys; Compose refuses the file. The merge
    key `<<` is left to PyYAML, whose merged keys a mapping may override.
    """

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_compose(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as Compose sees it with `environ` (default: nothing set)."""
    text = COMPOSE_FILE.read_text(encoding="utf-8")
    raw = yaml.load(text, Loader=_UniqueKeyLoader)
    assert isinstance(raw, dict), "docker-compose.yml must be a mapping"
    resolved_file: dict[str, Any] = _resolve(raw, environ or {})
    return resolved_file


@functools.cache
def compose() -> dict[str, Any]:
    return load_compose()


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"docker-compose.yml has no service {name}"
    found: dict[str, Any] = services[name]
    return found


def command(name: str) -> list[str]:
    value = service(name).get("command")
    assert value, f"service {name} has no command"
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def option(args: list[str], name: str) -> str | None:
    """The value given to `name` in `args` (`--x v` or `--x=v`), or None."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def app_environ(name: str) -> dict[str, str]:
    env = service(name).get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(k): str(v) for k, v in env.items()}


def depends_on(name: str) -> dict[str, str]:
    """The services `name` waits for, with their conditions."""
    deps = service(name).get("depends_on", {})
    if isinstance(deps, list):
        # The short form only waits for the container to start.
        return dict.fromkeys(deps, "service_started")
    return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}


def published(name: str) -> list[tuple[str, str, str]]:
    """The ports of `name` as (host address, host port, container port)."""
    ports: list[tuple[str, str, str]] = []
    for entry in service(name).get("ports", []):
        if isinstance(entry, dict):
            ports.append(
                (
                    str(entry.get("host_ip", "")),
                    str(entry.get("published", "")),
                    str(entry["target"]),
                )
            )
            continue
        parts = str(entry).split("/")[0].split(":")
        container = parts[-1]
        host_port = parts[-2] if len(parts) >= 2 else ""
        address = ":".join(parts[:-2])
        ports.append((address, host_port, container))
    return ports


def postgres_settings() -> dict[str, str]:
    args = command("postgres")
    assert args[0] == "postgres", "the postgres command must start the server"
    settings: dict[str, str] = {}
    for i, arg in enumerate(args):
        if arg == "-c":
            key, _, value = args[i + 1].partition("=")
            settings[key] = value
    return settings


def profile_of(args: list[str]) -> str:
    return option(args, "--cdc-profile") or option(args, "--profile") or DEFAULT_PROFILE


def load_for(name: str, path: str) -> Profile:
    """Load `path` as service `name` would, with its DATABASE_URL and REDIS_URL."""
    return load_profile(ROOT / path, environ=app_environ(name))


def pools(profile: Profile) -> int:
    """Every pool's maximum, the event store's writers included whatever the path."""
    return (
        profile.database.pool.max_size
        + profile.event_store.pool.max_size
        + profile.projection_store.pool.max_size
    )


def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    return instructions


def image_files() -> tuple[dict[PurePosixPath, Path], PurePosixPath]:
    """Where each COPY puts its source in the image, and the final WORKDIR."""
    workdir = PurePosixPath("/")
    placed: dict[PurePosixPath, Path] = {}
    for keyword, rest in dockerfile():
        if keyword == "WORKDIR":
            workdir = workdir / rest
        elif keyword == "COPY":
            args = [a for a in shlex.split(rest) if not a.startswith("--")]
            *sources, dest = args
            target = workdir / dest
            for source in sources:
                into_dir = dest.endswith("/") or len(sources) > 1
                at = target / PurePosixPath(source).name if into_dir else target
                placed[at] = ROOT / source
    return placed, workdir


def in_image(path: PurePosixPath, placed: Mapping[PurePosixPath, Path]) -> Path | None:
    """The repository file a COPY put at `path`, or None."""
    for at, source in placed.items():
        if path == at:
            return source
        if at in path.parents and source.is_dir():
            return source / path.relative_to(at)
    return None


def ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    patterns = [p.strip() for p in lines if p.strip() and not p.startswith("#")]
    # Exceptions would need Docker's full matcher; the matcher below has none.
    assert not any(p.startswith("!") for p in patterns), "no ! lines, please"
    return [p.strip("/") for p in patterns]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, POSIX) out of the context."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        for prefix in prefixes:
            if any(fnmatch.fnmatchcase(prefix, c) for c in candidates):
                return True
    return False


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def programs() -> dict[str, list[str]]:
    """Each command the image runs, by where it comes from."""
    found = {name: command(name) for name in APP_SERVICES}
    for keyword, rest in dockerfile():
        if keyword == "CMD":
            found["Dockerfile CMD"] = json.loads(rest)
    return found


# Locust's parser with the project's options, built as `locust -f` builds it. In a
# subprocess: importing the locustfile adds listeners to Locust's global events.
# `locust --help` would not do: Locust prints it before it imports the locustfile,
# so the project's options are missing from it.
_LOCUST_PROBE = """
import contextlib, io, json, sys
import locustfile
from locust.argument_parser import get_parser

parser = get_parser()
errors = {}
for name, args in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit:
        errors[name] = err.getvalue().strip().splitlines()[-1]
print(json.dumps({"help": parser.format_help(), "errors": errors}))
"""


def probe_locust(commands: Mapping[str, list[str]]) -> tuple[set[str], dict[str, str]]:
    """Locust's options, and the parse error of each command that has one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "LOCUST_"))}
    done = subprocess.run(
        [sys.executable, "-c", _LOCUST_PROBE, json.dumps(commands)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    options = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", result["help"]))
    return options, result["errors"]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in cli.parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: dict[str, argparse.ArgumentParser] = action.choices
            return found
    raise AssertionError("services.cli.parser() has no sub-commands")


# The file itself.


def test_top_level_and_service_keys_are_known() -> None:
    # x- keys are extensions, for anchors; `version` is obsolete and refused here.
    top = {key for key in compose() if not key.startswith("x-")}
    assert top <= TOP_LEVEL_KEYS, (
        f"unknown top-level keys {sorted(top - TOP_LEVEL_KEYS)}"
    )
    for name, spec in compose()["services"].items():
        unknown = set(spec) - SERVICE_KEYS
        assert not unknown, f"service {name}: unknown keys {sorted(unknown)}"


def test_duplicate_keys_are_refused() -> None:
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load("a: 1\nb: 2\na: 3\n", Loader=_UniqueKeyLoader)
    merged = yaml.load(
        "x: &x {a: 1, b: 2}\ny:\n  <<: *x\n  a: 3\n",
        Loader=_UniqueKeyLoader,
    )
    assert merged["y"] == {"a": 3, "b": 2}


def test_interpolation_follows_compose() -> None:
    env = {"SET": "x", "EMPTY": ""}
    assert interpolate("${SET:-d}/${EMPTY:-d}/${EMPTY-d}/$SET/$$SET", env) == (
        "x/d//x/$SET"
    )
    for bad in ("$(cat f)", "${UNSET}", "${A:-${B}}"):
        with pytest.raises(ValueError):
            interpolate(bad, env)


# The servers.


def test_postgres_is_an_official_image_with_logical_decoding() -> None:
    assert service("postgres")["image"] in ("postgres:15", "postgres:16")
    settings = postgres_settings()

    assert settings.get("wal_level") == "logical"
    # The consumer's slot and stream, plus one more for a second consumer or a test.
    assert int(settings.get("max_replication_slots", "0")) >= 2
    assert int(settings.get("max_wal_senders", "0")) >= 2


def test_max_connections_fits_optimized_and_not_baseline() -> None:
    settings = postgres_settings()
    limit = int(settings["max_connections"])
    reserved = int(
        settings.get("superuser_reserved_connections", DEFAULT_RESERVED_CONNECTIONS)
    ) + int(settings.get("reserved_connections", "0"))
    optimized = load_for("master", "configs/optimized.yaml")
    baseline = load_for("master", "configs/baseline.yaml")
    tools = budget.REPLICATION_CONNECTIONS + budget.TOOL_CONNECTIONS

    # The master's preflight does this arithmetic and refuses what does not fit.
    for workers in WORKER_COUNTS:
        fits = budget.plan(
            optimized, workers=workers, max_connections=limit, reserved=reserved
        )
        assert fits.fits, fits.describe()
        refused = budget.plan(
            baseline, workers=workers, max_connections=limit, reserved=reserved
        )
        assert not refused.fits, refused.describe()
    # With room to spare: even with the batched path's writer pool open too.
    needed = pools(optimized) + tools + reserved
    assert needed <= limit, f"optimized needs {needed}, max_connections={limit}"
    # The baseline reproduces exhaustion: its pools alone must not fit.
    assert pools(baseline) > limit, f"baseline fits in max_connections={limit}"


def test_max_connections_matches_the_private_server() -> None:
    # scripts/services.sh sizes the server `make` starts; both must behave alike.
    text = (ROOT / "scripts" / "services.sh").read_text(encoding="utf-8")
    found = re.search(r"PG_MAX_CONNECTIONS=\$\{CDC_PG_MAX_CONNECTIONS:-(\d+)\}", text)
    assert found, "scripts/services.sh no longer sets PG_MAX_CONNECTIONS"
    assert postgres_settings()["max_connections"] == found[1]


def test_postgres_healthcheck_probes_tcp() -> None:
    test = service("postgres")["healthcheck"]["test"]

    assert "pg_isready" in test
    # The image's first-start server answers on the socket only: TCP means ready.
    assert option(test, "-h") == "127.0.0.1"


def test_redis_has_no_persistence_and_a_healthcheck() -> None:
    spec = service("redis")
    args = command("redis")

    assert spec["image"].startswith("redis:")
    assert option(args, "--save") == ""
    assert option(args, "--appendonly") == "no"
    assert not spec.get("volumes")
    assert spec["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]


# The applications.


def test_app_services_share_one_image_built_here() -> None:
    builds = set()
    for name in APP_SERVICES:
        spec = service(name)
        build = spec.get("build")
        assert build is not None, f"service {name} is not built from this repo"
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile_name = (
            "Dockerfile"
            if isinstance(build, str)
            else build.get("dockerfile", "Dockerfile")
        )
        assert (ROOT / context / dockerfile_name).resolve() == DOCKERFILE
        builds.add((context, dockerfile_name, spec.get("image")))
    assert len(builds) == 1, f"master, worker and consumer differ: {builds}"


def test_app_services_point_at_the_servers() -> None:
    for name in APP_SERVICES:
        env = app_environ(name)
        db = urlsplit(env["DATABASE_URL"])
        cache = urlsplit(env["REDIS_URL"])

        assert (db.hostname, db.port or 5432) == ("postgres", 5432), name
        assert (cache.hostname, cache.port or 6379) == ("redis", 6379), name
        password = service("postgres")["environment"].get("POSTGRES_PASSWORD")
        if password is None:
            assert service("postgres")["environment"]["POSTGRES_HOST_AUTH_METHOD"]
        else:
            assert db.password == password, f"{name}: not the server's password"


def test_password_follows_its_variable_and_is_masked() -> None:
    # One variable sets both ends; a password written out in one place would drift.
    env = {"POSTGRES_PASSWORD": "s3cret-from-env"}
    file = load_compose(env)
    server = file["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert server == env["POSTGRES_PASSWORD"]
    for name in APP_SERVICES:
        url = file["services"][name]["environment"]["DATABASE_URL"]
        assert urlsplit(url).password == env["POSTGRES_PASSWORD"], name
        profile = load_profile(ROOT / DEFAULT_PROFILE, environ={"DATABASE_URL": url})
        assert env["POSTGRES_PASSWORD"] not in json.dumps(resolved(profile))


def test_start_order_waits_for_healthy_servers() -> None:
    for name in APP_SERVICES:
        deps = depends_on(name)
        assert deps.get("postgres") == "service_healthy", name
        assert deps.get("redis") == "service_healthy", name
    assert depends_on("master").get("consumer") in (
        "service_healthy",
        "service_started",
    ), "the master must start after the consumer"
    assert "master" in depends_on("worker")
    for name in compose()["services"]:
        for dep, condition in depends_on(name).items():
            assert dep in compose()["services"], f"{name} waits for unknown {dep}"
            if condition == "service_healthy":
                assert "healthcheck" in service(dep), f"{dep} has no healthcheck"


def test_consumer_healthcheck_reads_its_ready_file_on_a_tmpfs() -> None:
    args = command("consumer")
    ready = option(args, "--ready-file")
    assert ready, "the consumer writes no ready file"
    test = service("consumer")["healthcheck"]["test"]
    assert ready in " ".join(test), "the healthcheck does not read the ready file"
    # On the container's own disk the file would survive a restart and report a
    # consumer healthy before it is.
    tmpfs = service("consumer").get("tmpfs", [])
    mounts = [PurePosixPath(t.split(":")[0]) for t in tmpfs]
    assert any(m in PurePosixPath(ready).parents for m in mounts)


def test_locust_commands_use_real_options() -> None:
    locust = {n: command(n) for n in ("master", "worker")}
    for name, args in locust.items():
        assert args[0] == "locust", name
    options, errors = probe_locust({n: a[1:] for n, a in locust.items()})

    # The probe saw the project's options: otherwise every check below is void.
    assert "--cdc-profile" in options
    for name, args in locust.items():
        used = [a.partition("=")[0] for a in args[1:] if a.startswith("-")]
        unknown = [a for a in used if a not in options]
        assert not unknown, f"{name}: Locust has no {unknown}"
        assert name not in errors, f"{name}: {errors.get(name)}"
    assert "--master" in locust["master"]
    assert "--worker" in locust["worker"]
    assert option(locust["master"], "-f") == option(locust["worker"], "-f")


def test_cdc_load_commands_use_real_subcommands_and_options() -> None:
    subs = subcommands()
    checked = 0
    for name, args in programs().items():
        if args[0] != "cdc-load":
            continue
        sub = next(a for a in args[1:] if not a.startswith("-"))
        assert sub in subs, f"{name}: cdc-load has no sub-command {sub}"
        known = {s for a in subs[sub]._actions for s in a.option_strings}
        after = args[args.index(sub) + 1 :]
        unknown = [
            a.partition("=")[0]
            for a in after
            if a.startswith("-") and a.partition("=")[0] not in known
        ]
        assert not unknown, f"{name}: cdc-load {sub} has no {unknown}"
        try:
            cli.parser().parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{name}: cdc-load refuses {args[1:]}", pytrace=False)
        checked += 1
    assert checked >= 2, "expected the consumer and the image's CMD"


def test_profiles_exist_validate_and_are_known_to_make() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    known = set(re.findall(r"configs/[\w.-]+\.yaml", makefile))
    for name, args in programs().items():
        path = profile_of(args)
        env_of = name if name in APP_SERVICES else "master"
        profile = load_for(env_of, path)

        assert profile.database.url == app_environ(env_of)["DATABASE_URL"]
        assert path in known, f"{name} runs {path}, which the Makefile never runs"
    assert profile_of(command("master")) == profile_of(command("consumer"))


def test_web_ui_is_published_on_loopback_only() -> None:
    args = command("master")
    web_port = option(args, "--web-port") or option(args, "-P") or str(WEB_PORT)
    ports = published("master")
    ui = [p for p in ports if p[2] == web_port]

    # Inside the container the UI listens everywhere; the host publishes loopback.
    assert option(args, "--web-host") == "0.0.0.0"
    assert ui, f"the UI's port {web_port} is not published"
    assert all(address == "127.0.0.1" for address, _, _ in ui), ui
    assert all(host == str(WEB_PORT) for _, host, _ in ui), ui


def test_workers_reach_the_master_without_a_published_port() -> None:
    master, worker = command("master"), command("worker")
    bind_port = option(master, "--master-bind-port") or str(MASTER_PORT)

    assert option(worker, "--master-host") == "master"
    assert (option(worker, "--master-port") or str(MASTER_PORT)) == bind_port
    assert all(p[2] != bind_port for p in published("master")), "5557 is published"
    assert bind_port in [str(p) for p in service("master").get("expose", [])]
    for name in ("master", "worker"):
        assert "network_mode" not in service(name), name
    nets = [set(service(n).get("networks", ["default"])) for n in ("master", "worker")]
    assert nets[0] & nets[1], "master and worker share no network"


def test_worker_can_be_scaled() -> None:
    spec = service("worker")

    assert "container_name" not in spec
    assert not spec.get("ports"), "a host port can be bound by one worker only"
    assert "hostname" not in spec


def test_master_writes_reports_to_a_volume() -> None:
    _, workdir = image_files()
    folder = workdir / verify.REPORT_PATH.parent
    volumes = compose().get("volumes") or {}
    mounts = [str(v).split(":") for v in service("master").get("volumes", [])]
    sources = [m[0] for m in mounts if len(m) >= 2 and PurePosixPath(m[1]) == folder]
    user = [rest for keyword, rest in dockerfile() if keyword == "USER"]

    # Relative to the working directory: that is where verification writes.
    assert sources, f"the master mounts nothing at {folder}"
    assert all(s in volumes or s.startswith((".", "/")) for s in sources), sources
    assert user and user[-1] not in ("root", "0"), "the image runs as root"
    assert any(
        keyword == "RUN"
        and f"chown {user[-1]}" in rest
        and str(verify.REPORT_PATH.parent) in rest
        for keyword, rest in dockerfile()
    ), f"{folder} is not writable by {user[-1]}"


# The image.


def test_dockerfile_installs_the_package_without_dev_extras() -> None:
    instructions = dockerfile()
    base = next(rest for keyword, rest in instructions if keyword == "FROM")
    image, _, tag = base.partition(":")
    placed, _ = image_files()
    installs = [
        rest for keyword, rest in instructions if keyword == "RUN" and "pip" in rest
    ]

    minimum = re.search(r">=\s*(\d+)\.(\d+)", pyproject()["project"]["requires-python"])
    assert minimum
    version = tuple(int(n) for n in tag.split("-")[0].split("."))
    assert image == "python" and tag.endswith("-slim"), base
    assert version >= (int(minimum[1]), int(minimum[2])), base
    assert len(installs) == 1, installs
    words = shlex.split(installs[0].split("&&")[0])
    assert words[:2] in (["pip", "install"], ["pip3", "install"]), installs[0]
    assert "-e" not in words and "--editable" not in words
    targets = [w for w in words[2:] if not w.startswith("-")]
    assert len(targets) == 1 and "[" not in targets[0], f"extras in {targets}"
    target = PurePosixPath(targets[0])
    assert in_image(target / "pyproject.toml", placed) == ROOT / "pyproject.toml"
    for package in pyproject()["tool"]["setuptools"]["packages"]:
        assert in_image(target / package, placed) == ROOT / package, package


def test_image_has_the_programs_and_files_its_commands_use() -> None:
    project = pyproject()["project"]
    installed = set(project["scripts"])
    if any(re.match(r"locust\b", d) for d in project["dependencies"]):
        installed.add("locust")
    placed, workdir = image_files()

    for name, args in programs().items():
        assert args[0] in installed, f"{name}: {args[0]} is not installed"
        needs = [profile_of(args)]
        if args[0] == "locust":
            needs.append(option(args, "-f") or "locustfile.py")
        for relative in needs:
            source = in_image(workdir / relative, placed)
            assert source is not None and source.is_file(), f"{name}: {relative}"


def test_dockerignore_drops_local_state_and_keeps_what_is_copied() -> None:
    patterns = ignore_patterns()
    placed, _ = image_files()

    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        "reports/optimized.html",
        ".pytest_cache/v",
        ".mypy_cache/3.11",
        ".ruff_cache/x",
        "services/__pycache__/cli.cpython-311.pyc",
    ):
        assert ignored(path, patterns), f"{path} is sent to the build"
    for source in placed.values():
        files = [source] if source.is_file() else list(source.rglob("*"))
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            if file.is_file() and "__pycache__" not in relative:
                assert not ignored(relative, patterns), f"{relative} is left out"


def test_dockerignore_matcher_can_refuse() -> None:
    # The matcher above must be able to say no, or the last check proves nothing.
    assert ignored("configs/optimized.yaml", ["*.yaml", "configs"]) is True
    assert ignored("a/b/__pycache__/x.pyc", ["**/__pycache__"]) is True
    assert ignored("configs/optimized.yaml", ["reports", ".venv"]) is False


def _compose_cli() -> bool:
    try:
        done = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@pytest.mark.skipif(not _compose_cli(), reason="no `docker compose` on this machine")
def test_docker_compose_accepts_the_file() -> None:
    # Compose's own validation needs no engine; the checks above do not need it.
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "config", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
