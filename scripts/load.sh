#!/usr/bin/env bash
# One headless run of a profile, end to end:
#   reset -> CDC consumer (its own process) -> Locust until target_ops -> drain ->
#   verification -> summary -> consumer stopped -> exit code
#   scripts/load.sh configs/optimized.yaml [extra locust options]
# Expects DATABASE_URL and REDIS_URL (scripts/services.sh run sets them). Exit 0 only
# if verification passed and the profile's thresholds held.
set -uo pipefail
profile=${1:?usage: scripts/load.sh PROFILE [locust options]}
shift
name=$(basename "$profile" .yaml)
bin=.venv/bin
mkdir -p reports

overcommit=
for arg in "$@"; do
  [ "$arg" = --cdc-allow-overcommit ] && overcommit=--allow-overcommit
done

# Validate first: a bad profile, or one that cannot fit the server, is refused in
# one line with exit 2, before anything is written.
$bin/cdc-load check-config --profile "$profile" >/dev/null || exit 2
$bin/cdc-load preflight --profile "$profile" $overcommit || exit 2
$bin/cdc-load reset --profile "$profile" || exit 2

ready=reports/.$name-consumer.ready
rm -f "$ready"
$bin/cdc-load consumer --profile "$profile" --ready-file "$ready" \
  >"reports/$name-consumer.log" 2>&1 &
consumer=$!
stop_consumer() {
  if kill -0 "$consumer" 2>/dev/null; then
    kill -TERM "$consumer"
    wait "$consumer"
    return $?
  fi
  wait "$consumer" 2>/dev/null
}
trap 'stop_consumer >/dev/null 2>&1' EXIT

echo "load: waiting for the CDC consumer (log: reports/$name-consumer.log)"
for _ in $(seq 600); do
  [ -f "$ready" ] && break
  if ! kill -0 "$consumer" 2>/dev/null; then
    echo "load: the CDC consumer exited before it was ready:"
    tail -n 5 "reports/$name-consumer.log"
    exit 2
  fi
  sleep 0.1
done
[ -f "$ready" ] || { echo "load: the CDC consumer did not start in 60 s"; exit 2; }
rm -f "$ready"

$bin/locust -f locustfile.py --headless --only-summary \
  --cdc-profile "$profile" \
  --csv "reports/$name" --csv-full-history --html "reports/$name.html" \
  --cdc-summary "reports/$name-summary.json" "$@"
rc=$?

stop_consumer
consumer_rc=$?
trap - EXIT
echo "load: consumer stopped (exit $consumer_rc); its last lines:"
grep -E "consumer stopped|slot .*confirmed" "reports/$name-consumer.log" | sed 's/^/  /'
echo "load: reports in reports/ ($name.html, ${name}_stats.csv, $name-summary.json," \
  "verification.json)"
if [ "$consumer_rc" != 0 ] && [ "$rc" = 0 ]; then
  echo "load: the consumer failed; see reports/$name-consumer.log"
  rc=1
fi
exit $rc
