#!/usr/bin/env bash
# Brings covi up on this machine: installs what is missing, builds the control plane
# and covi, starts etcd + kube-apiserver + kube-controller-manager on loopback, installs
# the CRDs and applies examples/. Runs in the foreground until Ctrl-C (or hack/down.sh),
# then tears everything down.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$COVI_ROOT/hack/testbed.sh"
cd "$COVI_ROOT"

state="$COVI_CACHE/up"
trap 'testbed_stop; rm -f "$state.pid"' EXIT
trap 'exit 130' INT TERM

phase "install packages"
"$COVI_ROOT/hack/install-deps.sh"
phase "build control plane"
"$COVI_ROOT/hack/build-control-plane.sh"
phase "build covi"
cargo build --workspace --bins --quiet

phase "start control plane"
testbed_start "$state"
echo $$ >"$state.pid"

phase "install CRDs"
kubectl apply --server-side --field-manager covi-up -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout 60s -f crds/ >/dev/null

phase "apply examples"
kubectl apply --server-side --field-manager covi-up -f examples/
phase ""

cat <<MSG

covi is up. In another terminal:

  export KUBECONFIG=$KUBECONFIG PATH=$CONTROL_PLANE_BIN:\$PATH
  kubectl get covi -A
  kubectl explain virtualserver.spec
  kubectl get hostpools,hosts
  kubectl get vs,vmr -o wide

Ctrl-C here (or hack/down.sh) stops everything.
MSG

# Wait on the API server: if it dies, say so instead of pretending to be up.
while kill -0 "$(cat "$state/pids/kube-apiserver")" 2>/dev/null; do sleep 1; done
echo "kube-apiserver exited; its log: $state/logs/kube-apiserver.log" >&2
exit 1
