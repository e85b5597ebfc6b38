#!/usr/bin/env bash
# Checks covi's protocols exhaustively to larger bounds than CI does and prints the
# number of states and the time taken for each (docs/model.md).
#   hack/model-check.sh                                   the bounds docs/model.md reports
#   hack/model-check.sh failover --hosts=3 --faults=4     one model, any covi-model flags (--help)
#   hack/model-check.sh failover --race=lease_cache_trusted   put a fixed race back: expect a trace
#   hack/model-check.sh election --race=standby_cache_kept
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p covi-model --quiet
if [ $# -gt 0 ]; then
  exec target/release/covi-model "$@"
fi
status=0
for args in \
  "failover --hosts=2 --faults=2" \
  "failover --hosts=2 --faults=3" \
  "failover --hosts=2 --faults=1 --deletion" \
  "failover --hosts=2 --faults=2 --deletion" \
  "failover --hosts=2 --faults=2 --hangs --disk-leases" \
  "failover --hosts=2 --faults=1 --liveness" \
  "failover --hosts=2 --faults=0 --migration=live" \
  "failover --hosts=2 --faults=0 --migration=cold" \
  "failover --hosts=2 --faults=0 --migration=live --liveness" \
  "election --faults=3" \
  "election --faults=3 --one-identity"; do
  echo "== covi-model $args"
  # shellcheck disable=SC2086
  target/release/covi-model $args || status=1
done
exit "$status"
