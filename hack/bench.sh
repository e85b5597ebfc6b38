#!/usr/bin/env bash
# The scale and speed benchmark (not part of the test suite): builds release binaries,
# starts the test bed, runs covi-bench (tests/bench/main.rs) and prints its report,
# also written as JSON to .cache/bench/report-<pid>.json.
#   hack/bench.sh                                   bursts 100x50 and 1000x200, floor, failover
#   COVI_BENCH_BURSTS=100x50 hack/bench.sh          one small burst
#   COVI_BENCH_SCALE=2000x20000 hack/bench.sh       also the scale run (hosts x servers)
#   COVI_BENCH_REPEAT=5                             repetitions of each burst size (median and spread)
#   COVI_BENCH_FAILOVER=off                         skip the failover measurement
#   COVI_BENCH_PPROF=1                              CPU profile of kube-apiserver per burst (.cache/bench/*.pprof)
#   COVI_BENCH_RENEW_SECONDS=5                      bursts' pool: renew 5 s, fence 15 s, lease 25 s (large fleets)
#   COVI_APISERVER_ARGS="--max-requests-inflight=100 --max-mutating-requests-inflight=50"
#                                                   more kube-apiserver flags (hack/testbed.sh; this one
#                                                   fenced more hosts, docs/benchmark.md)
# Targets (reported against, never asserted): see docs/benchmark.md.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
cd "$COVI_ROOT"
phase "build release binaries"
cargo build --release --locked --bins
export COVI_BIN_DIR="${CARGO_TARGET_DIR:-$COVI_ROOT/target}/release"
phase ""
# The test bed as for the tests; the bench replaces the test run.
exec "$COVI_ROOT/hack/test.sh" -- "$COVI_BIN_DIR/covi-bench"
