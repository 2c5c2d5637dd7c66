#!/usr/bin/env bash
# One headless load run of a profile: setup, Locust, reports, exit code.
#   scripts/load.sh configs/optimized.yaml [extra locust options]
# Expects DATABASE_URL and REDIS_URL (scripts/services.sh run sets them).
set -euo pipefail
profile=${1:?usage: scripts/load.sh PROFILE [locust options]}
shift
name=$(basename "$profile" .yaml)
bin=.venv/bin
mkdir -p reports

# Validate first: a bad profile is one line and exit 2, before anything is written.
$bin/cdc-load check-config --profile "$profile" >/dev/null
$bin/cdc-load setup --reset --profile "$profile"

$bin/locust -f locustfile.py --headless --only-summary \
  --cdc-profile "$profile" \
  --csv "reports/$name" --html "reports/$name.html" \
  --cdc-summary "reports/$name-summary.json" "$@"
