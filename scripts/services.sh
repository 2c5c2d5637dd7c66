#!/usr/bin/env bash
# Make sure a PostgreSQL with wal_level=logical and a Redis are reachable.
#
#   scripts/services.sh up      start private servers unless DATABASE_URL / REDIS_URL
#                               are set; print the URLs as shell assignments
#   scripts/services.sh down    stop the private servers this script started
#   scripts/services.sh run CMD ...
#                               up, run CMD with DATABASE_URL and REDIS_URL exported,
#                               then down for whatever this call started
#
# The private servers come from the installed binaries, not from a package manager:
# PostgreSQL is a throwaway cluster (initdb) on PG_PORT, Redis a redis-server on
# REDIS_PORT. They live under STATE_DIR, outside the checkout, because as root the
# cluster has to run as the postgres user, which cannot enter a private temp folder.
set -euo pipefail

PG_PORT=${CDC_PG_PORT:-54329}
REDIS_PORT=${CDC_REDIS_PORT:-56379}
STATE_DIR=${CDC_STATE_DIR:-/tmp/cdc-load-$(id -u)}
PG_DATA=$STATE_DIR/pg-$PG_PORT
REDIS_DIR=$STATE_DIR/redis-$REDIS_PORT
# Sized so the optimized profile fits with room for a consumer and a verifier, and
# the baseline profile does not: that is the point of the baseline.
PG_MAX_CONNECTIONS=${CDC_PG_MAX_CONNECTIONS:-250}

say() { echo "services: $*" >&2; }
die() { say "$*"; exit 2; }

find_pg_bin() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  fi
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    [ -x "$d/initdb" ] && { echo "$d"; return; }
  done
  return 1
}

as_pg() {
  # initdb and postgres refuse to run as root.
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_up() {
  if [ -n "${DATABASE_URL:-}" ]; then
    local level
    level=$(psql -XAtq "$DATABASE_URL" -c "show wal_level" 2>&1) ||
      die "DATABASE_URL does not answer: $level"
    [ "$level" = logical ] || die "the server at DATABASE_URL has wal_level=$level;\
 logical decoding needs wal_level=logical (ALTER SYSTEM SET wal_level = logical,\
 then restart it), max_replication_slots >= 2 and max_wal_senders >= 2"
    return 0
  fi
  local bin
  bin=$(find_pg_bin) || die "no PostgreSQL server binaries (initdb) found; install\
 the postgresql package or set DATABASE_URL to a server with wal_level=logical"
  if "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; then
    say "reusing the PostgreSQL already on port $PG_PORT"
    return 0
  fi
  rm -rf "$PG_DATA"
  mkdir -p "$STATE_DIR"
  chmod 755 "$STATE_DIR"
  mkdir -p "$PG_DATA"
  [ "$(id -u)" = 0 ] && chown postgres: "$PG_DATA"
  as_pg "$bin/initdb" -D "$PG_DATA" -U postgres -A trust -E UTF8 --no-sync >/dev/null ||
    die "initdb failed in $PG_DATA"
  cat >>"$PG_DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DATA'
max_connections = $PG_MAX_CONNECTIONS
wal_level = logical
max_replication_slots = 16
max_wal_senders = 16
shared_buffers = 256MB
max_wal_size = 2GB
log_min_messages = warning
CONF
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_DATA/server.log" -w -t 60 start >/dev/null ||
    die "PostgreSQL did not start; see $PG_DATA/server.log"
  touch "$STATE_DIR/pg-$PG_PORT.ours"
  say "started a private PostgreSQL (wal_level=logical) on 127.0.0.1:$PG_PORT"
}

pg_down() {
  [ -f "$STATE_DIR/pg-$PG_PORT.ours" ] || return 0
  local bin
  bin=$(find_pg_bin) || return 0
  as_pg "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$PG_DATA" "$STATE_DIR/pg-$PG_PORT.ours"
  say "stopped the private PostgreSQL on port $PG_PORT"
}

redis_up() {
  if [ -n "${REDIS_URL:-}" ]; then
    return 0
  fi
  command -v redis-server >/dev/null 2>&1 || die "redis-server not found; install\
 the redis-server package or set REDIS_URL"
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    say "reusing the Redis already on port $REDIS_PORT"
    return 0
  fi
  mkdir -p "$REDIS_DIR"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
    --appendonly no --dir "$REDIS_DIR" --logfile "$REDIS_DIR/redis.log" \
    --pidfile "$REDIS_DIR/redis.pid" >/dev/null || die "redis-server did not start"
  for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || die "redis-server did not answer"
  touch "$STATE_DIR/redis-$REDIS_PORT.ours"
  say "started a private Redis on 127.0.0.1:$REDIS_PORT"
}

redis_down() {
  [ -f "$STATE_DIR/redis-$REDIS_PORT.ours" ] || return 0
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$REDIS_DIR" "$STATE_DIR/redis-$REDIS_PORT.ours"
  say "stopped the private Redis on port $REDIS_PORT"
}

urls() {
  echo "DATABASE_URL=${DATABASE_URL:-postgresql://postgres@127.0.0.1:$PG_PORT/postgres}"
  echo "REDIS_URL=${REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"
}

case "${1:-}" in
  up)
    pg_up
    redis_up
    urls
    ;;
  down)
    redis_down
    pg_down
    ;;
  run)
    shift
    [ $# -gt 0 ] || die "usage: $0 run CMD ..."
    started_pg=0
    started_redis=0
    [ -z "${DATABASE_URL:-}" ] && [ ! -f "$STATE_DIR/pg-$PG_PORT.ours" ] && started_pg=1
    [ -z "${REDIS_URL:-}" ] && [ ! -f "$STATE_DIR/redis-$REDIS_PORT.ours" ] &&
      started_redis=1
    cleanup() {
      [ $started_redis = 1 ] && redis_down
      [ $started_pg = 1 ] && pg_down
      return 0
    }
    trap cleanup EXIT
    pg_up
    redis_up
    eval "export $(urls | tr '\n' ' ')"
    set +e
    "$@"
    rc=$?
    set -e
    exit $rc
    ;;
  *)
    die "usage: $0 up | down | run CMD ..."
    ;;
esac
