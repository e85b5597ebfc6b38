#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   hack/test.sh                       everything
#   hack/test.sh -- CMD...             set up the test bed, then run CMD in it instead
#                                      (e.g. hack/test.sh -- cargo test -p covi-tests --test api)
# Installs what is missing, builds the pinned control plane (cached), checks format,
# lints and CRD drift, starts etcd + kube-apiserver + kube-controller-manager on
# loopback, runs every test against them, and tears it all down. Prints each phase's time.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$COVI_ROOT/hack/testbed.sh"
cd "$COVI_ROOT"

custom=()
if [ "${1:-}" = "--" ]; then
  shift
  custom=("$@")
fi

trap 'testbed_stop' EXIT
trap 'exit 130' INT TERM
total_start=$(date +%s)
# Panic messages say what failed; backtraces of async test code mostly hide them.
export RUST_BACKTRACE=0

phase "install packages"
"$COVI_ROOT/hack/install-deps.sh"

phase "build control plane"
"$COVI_ROOT/hack/build-control-plane.sh"

phase "build tools"
"$COVI_ROOT/hack/build-tools.sh"

phase "Xen lab image"
# dom0's root file system for tests/xen.rs (cached; a few minutes on a fresh machine).
"$COVI_ROOT/hack/xen-lab.sh" image

if [ "${#custom[@]}" -eq 0 ]; then
  phase "cargo fmt --check"
  cargo fmt --all -- --check

  phase "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings

  phase "generated files drift check"
  cargo run --quiet --locked -p crdgen -- --check crds charts/covi/crds
  "$COVI_ROOT/hack/render-deploy.sh" --check

  phase "build"
  cargo build --workspace --bins --locked
  cargo test --workspace --locked --no-run
else
  # Tests start the covi binaries: build them, so a test never runs stale ones.
  phase "build binaries"
  cargo build --workspace --bins --locked --quiet
fi
# hack/bench.sh sets it to the release binaries.
export COVI_BIN_DIR="${COVI_BIN_DIR:-${CARGO_TARGET_DIR:-$COVI_ROOT/target}/debug}"

phase "start control plane"
# A failed run leaves its test bed (logs, etcd data) for inspection; keep the last three.
{ ls -dt "$COVI_CACHE"/testbed/test-* 2>/dev/null || true; } | tail -n +3 | xargs -r rm -rf
testbed_start "$COVI_CACHE/testbed/test-$$"
echo "test bed: $COVI_APISERVER (state in $COVI_TESTBED_DIR)"

phase "start libvirtd"
testbed_libvirtd
testbed_libvirt_peers

if [ "${#custom[@]}" -gt 0 ]; then
  phase "run: ${custom[*]}"
  "${custom[@]}"
else
  phase "cargo test"
  cargo test --workspace --locked
fi

phase "stop control plane"
testbed_stop
rm -rf "$COVI_TESTBED_DIR"
phase ""
echo "[time] total $(( $(date +%s) - total_start ))s" >&2
