# The test bed's real node: containerd and runc (Debian's), CNI bridge networking, and
# kubelet, kube-proxy and kube-scheduler built from the same Kubernetes module as the
# API server, so covi is installed the way users install it: `helm install` with images
# built from this repository (hack/build-images.sh) and imported into containerd.
# Source it after hack/lib.sh and hack/testbed.sh; `testbed_node` after testbed_start.
# Needs root. testbed_stop stops it: pods first (through the CRI, so CNI releases their
# addresses), then the processes, then every mount, netns and iptables rule it made.
#
# testbed_node exports:
#   COVI_NODE_NAME        the Node's name (labelled covi.io/hypervisor=true)
#   COVI_NODE_IP          its address; the API server advertises it to pods too
#   COVI_NODE_CONTAINERD  containerd's socket
#   COVI_IMAGE_REGISTRY   registry part of the imported images (helm: image.registry)
#   COVI_IMAGE_TAG        their tag (helm: image.tag)

COVI_NODE_NAME=covi-node
COVI_NODE_IP=10.203.0.1
COVI_NODE_DEVICE=covi-node0
COVI_POD_CIDR=10.244.0.0/24
_node_root=/var/lib/covi-node
_node_run=/run/covi-node
_node_started=0

# testbed_node_address: the node's address on a device of its own (an empty bridge:
# this kernel has no dummy devices), so that pods reach the
# API server (advertised there) through the `kubernetes` Service. Called by
# testbed_start before the API server starts.
testbed_node_address() {
  ip link show "$COVI_NODE_DEVICE" >/dev/null 2>&1 || ip link add "$COVI_NODE_DEVICE" type bridge
  ip addr replace "$COVI_NODE_IP/32" dev "$COVI_NODE_DEVICE"
  ip link set "$COVI_NODE_DEVICE" up
}

testbed_node() {
  local d=$COVI_TESTBED_DIR n=$COVI_TESTBED_DIR/node bin=$CONTROL_PLANE_BIN images tag
  if [ "$(id -u)" != 0 ]; then
    echo "testbed: not root, so no node (kubelet and containerd need root)" >&2
    return 1
  fi
  _node_cleanup
  mkdir -p "$n/cni" "$_node_root" "$_node_run"
  _node_started=1

  _testbed_sign "$d/certs" kubelet "/O=system:nodes/CN=system:node:$COVI_NODE_NAME"
  _testbed_sign "$d/certs" kubelet-serving "/CN=$COVI_NODE_NAME" \
    "subjectAltName=IP:$COVI_NODE_IP,DNS:$COVI_NODE_NAME"
  _testbed_sign "$d/certs" kube-proxy "/CN=system:kube-proxy"
  _testbed_sign "$d/certs" kube-scheduler "/CN=system:kube-scheduler"
  testbed_kubeconfig kubelet
  testbed_kubeconfig kube-proxy
  testbed_kubeconfig kube-scheduler

  # Images first: their tag names the sandbox image in containerd's configuration.
  images=$("$COVI_ROOT/hack/build-images.sh")
  echo "$images" | sed 's/^/testbed: image /' >&2
  tag=$(echo "$images" | awk '$1 == "tag" {print $2}')
  local pause_ref
  pause_ref=$(echo "$images" | awk '$2 ~ /\/pause:/ {print $2}')

  cat >"$n/containerd.toml" <<TOML
version = 2
root = "$_node_root/containerd"
state = "$_node_run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$_node_run/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_ref"
  # No process here may lower its OOM score (no CAP_SYS_RESOURCE on this machine):
  # sandboxes get containerd's own score instead of -998.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$n/cni"
TOML
  cat >"$n/cni/10-covi.conflist" <<JSON
{"cniVersion": "1.0.0", "name": "covi-node", "plugins": [
  {"type": "bridge", "bridge": "covi-cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$COVI_POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$_node_run/ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
JSON
  _testbed_spawn containerd /usr/bin/containerd --config "$n/containerd.toml"
  wait_for "containerd" 30 ctr --address "$_node_run/containerd.sock" version || {
    tail -n 20 "$d/logs/containerd.log" >&2; return 1; }
  local archive ref
  while read -r archive ref; do
    [ "$archive" = tag ] && continue
    ctr --address "$_node_run/containerd.sock" -n k8s.io images import "$archive" >/dev/null
  done <<<"$images"

  cat >"$n/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine runs cgroup v1; Kubernetes 1.35 refuses it unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$_node_run/containerd.sock
address: $COVI_NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/certs/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $d/certs/kubelet-serving.crt
tlsPrivateKeyFile: $d/certs/kubelet-serving.key
failSwapOn: false
# Imported images cannot be pulled again: never collect them, never evict for disk.
imageGCHighThresholdPercent: 100
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
resolvConf: /etc/resolv.conf
YAML
  _testbed_spawn kubelet "$bin/kubelet" --config "$n/kubelet.yaml" \
    --kubeconfig "$d/kubelet.kubeconfig" --root-dir "$_node_root/kubelet" \
    --hostname-override "$COVI_NODE_NAME" --node-ip "$COVI_NODE_IP" \
    --node-labels "covi.io/hypervisor=true"

  cat >"$n/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $d/kube-proxy.kubeconfig}
hostnameOverride: $COVI_NODE_NAME
mode: iptables
clusterCIDR: $COVI_POD_CIDR
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Leave the machine's conntrack sysctls alone.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  _testbed_spawn kube-proxy "$bin/kube-proxy" --config "$n/kube-proxy.yaml"
  _testbed_spawn kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$d/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$d/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$d/kube-scheduler.kubeconfig" \
    --leader-elect=false --secure-port 0

  # Services work once kube-proxy has written its rules and says so.
  if ! wait_for "kube-proxy" 60 curl -fsS http://127.0.0.1:10256/healthz; then
    tail -n 20 "$d/logs/kube-proxy.log" >&2
    return 1
  fi
  if ! wait_for "node $COVI_NODE_NAME Ready" 120 kubectl wait --for=condition=Ready \
      "node/$COVI_NODE_NAME" --timeout=2s; then
    tail -n 30 "$d/logs/kubelet.log" >&2
    return 1
  fi
  export COVI_NODE_NAME COVI_NODE_IP
  export COVI_NODE_CONTAINERD="$_node_run/containerd.sock"
  export COVI_IMAGE_REGISTRY=covi.local COVI_IMAGE_TAG=$tag
  echo "testbed: node $COVI_NODE_NAME Ready at $COVI_NODE_IP (images covi.local/*:$tag)"
}

# testbed_node_stop: every pod stopped and removed through the CRI while kubelet and
# containerd still run (CNI releases the pods' addresses and network namespaces); the
# processes are stopped by testbed_stop; then _node_cleanup.
testbed_node_stop() {
  [ "$_node_started" = 1 ] || return 0
  local crictl=(crictl --runtime-endpoint "unix://$_node_run/containerd.sock" --timeout 10s)
  if [ -S "$_node_run/containerd.sock" ]; then
    # kubelet would start them again.
    [ -f "$COVI_TESTBED_DIR/pids/kubelet" ] && kill "$(cat "$COVI_TESTBED_DIR/pids/kubelet")" 2>/dev/null
    "${crictl[@]}" rmp --all --force >/dev/null 2>&1 || true
  fi
}

# _node_cleanup: what a node left behind (an earlier run killed midway included):
# containers' shims, mounts, network namespaces, the bridge, kube-proxy's rules.
_node_cleanup() {
  local m pid
  for pid in $(pgrep -f "containerd-shim-runc-v2 .*-address $_node_run/containerd.sock" || true); do
    kill -KILL "$pid" 2>/dev/null || true
  done
  for m in $(findmnt -rn -o TARGET | grep -E "^($_node_root|$_node_run|/run/netns/cni-)" | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  rm -f /run/netns/cni-* 2>/dev/null || true
  ip link del covi-cni0 2>/dev/null || true
  [ -x "$CONTROL_PLANE_BIN/kube-proxy" ] && "$CONTROL_PLANE_BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
  # kubelet's own chains (it drops non-loopback packets to 127.0.0.0/8, for one).
  local ipt t c chain
  for ipt in iptables ip6tables; do
    for t in filter nat mangle; do
      for c in INPUT OUTPUT; do "$ipt" -t "$t" -D "$c" -j KUBE-FIREWALL 2>/dev/null || true; done
      for chain in KUBE-FIREWALL KUBE-KUBELET-CANARY KUBE-IPTABLES-HINT; do
        "$ipt" -t "$t" -F "$chain" 2>/dev/null && "$ipt" -t "$t" -X "$chain" 2>/dev/null || true
      done
    done
  done
  rm -rf "$_node_run" "$_node_root/kubelet"
}
