#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls exactly this):
#   hack/test.sh                       everything
#   hack/test.sh -- CMD...             set up the test bed, then run CMD in it instead
#                                      (e.g. hack/test.sh -- cargo test -p covi-tests --test api;
#                                      test targets on libvirt's test driver skip libvirtd,
#                                      the libvirt peers, the node and the Xen image)
# Installs what is missing, builds the pinned control plane (cached), checks format,
# lints and CRD drift, starts etcd + kube-apiserver + kube-controller-manager, libvirtd
# and a real node (kubelet, containerd; hack/node.sh) with covi's images, runs every
# test against them, and tears it all down. Prints each phase's time.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$COVI_ROOT/hack/testbed.sh"
cd "$COVI_ROOT"

custom=()
if [ "${1:-}" = "--" ]; then
  shift
  custom=("$@")
fi

# What the run needs of the test bed: everything, unless CMD names only test targets
# (--test NAME) that use libvirt's test driver (no libvirtd, no libvirt peers, no node,
# no Xen dom0 image). Any other target, or none named, gets all of it.
needs_libvirtd=1
needs_xen=1
needs_node=1
if [ "${#custom[@]}" -gt 0 ]; then
  asked=$(printf '%s\n' "${custom[@]}" | awk 'prev == "--test" { print } /^--test=/ { print substr($0, 8) } { prev = $0 }')
  if [ -n "$asked" ]; then
    needs_libvirtd=0
    needs_xen=0
    needs_node=0
    for t in $asked; do
      case "$t" in
        api | argocd_health | consolidation | domain_xml | failover | install | kstatus | migration | requests | servers) ;;
        qemu | disk_leases | usage | console | faults) needs_libvirtd=1 ;;
        node) needs_libvirtd=1 needs_node=1 ;;
        *) needs_libvirtd=1 needs_xen=1 needs_node=1 ;;
      esac
    done
  fi
fi

trap 'testbed_stop' EXIT
trap 'exit 130' INT TERM
total_start=$(date +%s)
# Panic messages say what failed; backtraces of async test code mostly hide them.
export RUST_BACKTRACE=0

phase "install packages"
if [ "$needs_libvirtd" = 1 ]; then
  "$COVI_ROOT/hack/install-deps.sh"
else
  "$COVI_ROOT/hack/install-deps.sh" --no-guests
fi

phase "build control plane"
"$COVI_ROOT/hack/build-control-plane.sh"

phase "build tools"
"$COVI_ROOT/hack/build-tools.sh"

if [ "$needs_libvirtd" = 1 ]; then
  phase "test guest"
  # The small guest real-QEMU tests boot (a Debian kernel and a busybox initramfs).
  COVI_GUEST_DIR=$("$COVI_ROOT/hack/guest.sh")
  export COVI_GUEST_DIR
fi

if [ "$needs_xen" = 1 ]; then
  phase "Xen lab image"
  # dom0's root file system for tests/xen.rs (cached; a few minutes on a fresh machine).
  "$COVI_ROOT/hack/xen-lab.sh" image
fi

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
# As root the node's address exists from here on: the API server reaches aggregated
# APIs served by test processes there (tests/console.rs).
[ "$(id -u)" = 0 ] && export COVI_NODE_IP

if [ "$needs_libvirtd" = 1 ]; then
  phase "start libvirtd"
  testbed_libvirtd
  testbed_libvirt_peers
fi

if [ "$needs_node" = 1 ] && [ "$(id -u)" != 0 ]; then
  echo "testbed: not root, so no node for tests/node.rs (kubelet and containerd need root)"
elif [ "$needs_node" = 1 ]; then
  phase "start the node"
  # kubelet, containerd, kube-proxy, kube-scheduler; covi's images built and imported,
  # and a second tag of them for tests/node.rs's `helm upgrade`.
  testbed_node
  next=$("$COVI_ROOT/hack/build-images.sh" --tag="$COVI_IMAGE_TAG-next" --import="$COVI_NODE_CONTAINERD")
  export COVI_IMAGE_NEXT_TAG="$COVI_IMAGE_TAG-next"
  echo "$next" | tail -n 1
fi

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
