#!/usr/bin/env bash
# Checks covi's failover protocol exhaustively to a larger bound than CI does and
# prints the number of states and the time taken (docs/model.md).
#   hack/model-check.sh                           3 hosts, 3 faults, no disk leases
#   hack/model-check.sh --hosts=3 --faults=4      any covi-model flags (see --help)
#   hack/model-check.sh --race=lease_cache_trusted        put a fixed race back: expect a trace
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p covi-model --quiet
exec target/release/covi-model "$@"
