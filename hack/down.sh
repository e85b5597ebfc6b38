#!/usr/bin/env bash
# Stops what hack/up.sh started (the same as Ctrl-C in its terminal).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
pidfile="$COVI_CACHE/up.pid"
if [ ! -f "$pidfile" ]; then
  echo "covi is not up (no $pidfile)"
  exit 0
fi
pid=$(cat "$pidfile")
kill -TERM "$pid" 2>/dev/null || true
for _ in $(seq 1 100); do
  kill -0 "$pid" 2>/dev/null || { echo "covi stopped"; exit 0; }
  sleep 0.1
done
echo "hack/up.sh (pid $pid) did not stop within 10s" >&2
exit 1
