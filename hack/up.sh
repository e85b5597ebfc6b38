#!/usr/bin/env bash
# Brings covi up on this machine: installs what is missing, builds the control plane
# and covi, starts etcd + kube-apiserver + kube-controller-manager on loopback, installs
# the CRDs, starts covi-operator and three covi-agents (libvirt's test driver; --qemu
# adds one agent on libvirtd with QEMU/TCG), applies examples/ and waits until the
# example server runs. With --helm, covi is installed as users install it instead: a
# real node (kubelet, containerd, kube-proxy), covi's images built from this checkout,
# `helm install` of charts/covi, and a real QEMU/TCG guest on the node's libvirtd.
# Runs in the foreground until Ctrl-C (or hack/down.sh), then tears everything down,
# guests included.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
. "$COVI_ROOT/hack/testbed.sh"
cd "$COVI_ROOT"

qemu=""
helm=""
usage="usage: hack/up.sh [--qemu | --helm]"
for arg in "$@"; do
  case "$arg" in
    --qemu) qemu=1 ;;
    --helm) helm=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; echo "$usage"; exit 0 ;;
    *) echo "unknown argument $arg ($usage)" >&2; exit 2 ;;
  esac
done
if [ -n "$qemu" ] && [ -n "$helm" ]; then
  echo "--qemu and --helm exclude each other ($usage)" >&2
  exit 2
fi
state="$COVI_CACHE/up"
trap 'testbed_stop; rm -f "$state.pid"' EXIT
trap 'exit 130' INT TERM

# qemu_example: a pool of the hosts labelled covi.io/pool=lab-qemu on libvirtd's QEMU
# and a server in it; waits until it runs.
qemu_example() {
  kubectl apply --server-side --field-manager covi-up -f - <<'YAML'
apiVersion: covi.io/v1alpha1
kind: HostPool
metadata: {name: lab-qemu}
spec:
  nodeSelector: {covi.io/pool: lab-qemu}
  hypervisor: qemu
  storage: {pool: covi-lab}
  images: [{name: tiny, volume: tiny.img}]
  network: {bridge: br-covi-lab, cidr: 10.30.0.0/24, gateway: 10.30.0.1}
---
apiVersion: covi.io/v1alpha1
kind: VirtualServer
metadata: {name: qemu-1}
spec:
  hostPool: lab-qemu
  resources: {cpus: 1, memory: 256Mi, disk: 1Gi}
  boot: {image: tiny}
  owner: you
  purpose: a real QEMU guest (no OS; it stops in its firmware)
YAML
  kubectl wait --for condition=Ready --timeout 120s virtualserver/qemu-1 >/dev/null
  echo "QEMU guest running: virsh -c qemu:///system list"
}

phase "install packages"
"$COVI_ROOT/hack/install-deps.sh"
phase "build control plane"
"$COVI_ROOT/hack/build-control-plane.sh"
if [ -n "$helm" ]; then
  phase "build tools"
  "$COVI_ROOT/hack/build-tools.sh"
fi
phase "build covi"
cargo build --workspace --bins --quiet

phase "start control plane"
testbed_start "$state"
echo $$ >"$state.pid"

if [ -n "$helm" ]; then
  phase "start the node"
  testbed_libvirtd
  testbed_qemu_fixtures br-covi-lab covi-lab /var/lib/covi-lab/pool
  testbed_node
  phase "helm install"
  helm install covi charts/covi --namespace covi-system --create-namespace --wait --timeout 3m \
    --set image.registry="$COVI_IMAGE_REGISTRY" --set image.tag="$COVI_IMAGE_TAG" \
    --set agent.libvirtUri=qemu:///system --set 'agent.hostLabels.covi\.io/pool=lab-qemu'
  phase "apply a server"
  qemu_example
  phase ""
  cat <<MSG

covi is up, installed by Helm on node $COVI_NODE_NAME. In another terminal:

  export KUBECONFIG=$KUBECONFIG PATH=$CONTROL_PLANE_BIN:$TOOLS_BIN:\$PATH
  kubectl get pods -n covi-system -o wide
  kubectl logs -n covi-system deploy/covi-operator
  kubectl get hosts,hostpools
  kubectl get vs qemu-1 -o wide
  helm status covi -n covi-system

Ctrl-C here (or hack/down.sh) stops everything, the guest included.
MSG
  while kill -0 "$(cat "$state/pids/kube-apiserver")" 2>/dev/null; do sleep 1; done
  echo "kube-apiserver exited; its log: $state/logs/kube-apiserver.log" >&2
  exit 1
fi

phase "install CRDs"
kubectl apply --server-side --field-manager covi-up -f crds/ >/dev/null
kubectl wait --for condition=Established --timeout 60s -f crds/ >/dev/null

phase "start covi"
bin="${CARGO_TARGET_DIR:-$COVI_ROOT/target}/debug"
kubectl create namespace covi-system --dry-run=client -o yaml | kubectl apply -f - >/dev/null
testbed_spawn_covi covi-operator "$bin/covi-operator" --kubeconfig "$KUBECONFIG" \
  --identity local-0 --metrics-addr 127.0.0.1:0
for i in 1 2 3; do
  testbed_node_xml "$state/host-$i.xml" 8 32
  testbed_spawn_covi "covi-agent-host-$i" "$bin/covi-agent" --kubeconfig "$KUBECONFIG" \
    --node-name "host-$i" --label covi.io/pool=lab --libvirt-uri "test://$state/host-$i.xml" \
    --metrics-addr 127.0.0.1:0 --work-dir "$state/work-$i"
done
if [ -n "$qemu" ]; then
  # A fourth host runs real QEMU/TCG guests through libvirtd, in a pool of its own.
  testbed_libvirtd
  testbed_qemu_fixtures br-covi-lab covi-lab /var/lib/covi-lab/pool
  testbed_spawn_covi covi-agent-qemu-1 "$bin/covi-agent" --kubeconfig "$KUBECONFIG" \
    --node-name qemu-1 --label covi.io/pool=lab-qemu --libvirt-uri qemu:///system \
    --metrics-addr 127.0.0.1:0 --work-dir "$state/work-qemu-1"
fi
wait_for "3 Ready hosts" 60 sh -c '[ "$(kubectl get hosts -o jsonpath="{.items[*].status.conditions[?(@.type==\"Ready\")].status}" | wc -w)" -ge 3 ]'

phase "apply examples"
# examples/host.yaml describes host-1, which the agent has registered already.
kubectl apply --server-side --field-manager covi-up -f examples/
kubectl wait --for condition=Ready --timeout 60s virtualserver/web-1 >/dev/null
[ -z "$qemu" ] || qemu_example

phase ""

cat <<MSG

covi is up. In another terminal:

  export KUBECONFIG=$KUBECONFIG PATH=$CONTROL_PLANE_BIN:\$PATH
  kubectl get covi -A
  kubectl get hostpools,hosts
  kubectl get vs -o wide
  kubectl describe vs web-1
  kubectl explain virtualserver.spec

Logs: $state/logs/ (covi-operator.log, covi-agent-host-N.log)

Ctrl-C here (or hack/down.sh) stops everything.
MSG

# Wait on the API server: if it dies, say so instead of pretending to be up.
while kill -0 "$(cat "$state/pids/kube-apiserver")" 2>/dev/null; do sleep 1; done
echo "kube-apiserver exited; its log: $state/logs/kube-apiserver.log" >&2
exit 1
