# The test bed's control plane: etcd, kube-apiserver and kube-controller-manager with
# throwaway certificates and RBAC, the recipe of controller-runtime's envtest plus the
# controller manager (garbage collection, and the workload controllers the node's pods
# need). As root the API server also listens on the node's address (hack/node.sh), so
# that pods reach it through the `kubernetes` Service; else on loopback only.
# Source it after hack/lib.sh; then `testbed_start DIR`, optionally `testbed_node`, and
# `testbed_stop`.
#
# testbed_start exports:
#   KUBECONFIG            admin kubeconfig (client certificate in group system:masters)
#   COVI_TESTBED_DIR      state folder: certs, logs, kubeconfigs
#   COVI_APISERVER        https://127.0.0.1:PORT
# COVI_APISERVER_ARGS, if set, adds flags to kube-apiserver (for the bench's
# experiments, e.g. --max-requests-inflight=N).
# Every process is started with a parent-death signal, so not even `kill -9` of the
# script leaves one behind.

_testbed_pids=()
_testbed_libvirt_pids=()
_testbed_libvirt_uris=()

# free_port: prints a TCP port on 127.0.0.1 that nothing listens on.
free_port() {
  local port
  while :; do
    port=$(( 20000 + RANDOM % 20000 ))
    ss -Hltn "sport = :$port" | grep -q . || { echo "$port"; return; }
  done
}

# wait_for DESCRIPTION DEADLINE_SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 deadline=$(( $(date +%s) + $2 ))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "testbed: timed out waiting for $what" >&2
      return 1
    fi
    sleep 0.2
  done
}

# _testbed_spawn NAME COMMAND...: COMMAND in the background, logging to DIR/logs/NAME.log,
# in a session of its own, so a Ctrl-C in the terminal reaches only the script, which
# then stops everything in order (libvirtd would otherwise quit at once, and the guests
# it runs could no longer be destroyed).
_testbed_spawn() {
  local name=$1
  shift
  setsid setpriv --pdeathsig KILL -- "$@" >"$COVI_TESTBED_DIR/logs/$name.log" 2>&1 &
  _testbed_pids+=("$!")
  echo "$!" >"$COVI_TESTBED_DIR/pids/$name"
}

# _testbed_certs DIR: a CA, the API server's serving certificate, client certificates
# for the admin and the controller manager, and the service-account signing key.
_testbed_certs() {
  local d=$1
  mkdir -p "$d"
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=covi-testbed-ca" \
    -keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
  # 10.0.0.1 is the `kubernetes` Service's ClusterIP, which pods on the node dial.
  _testbed_sign "$d" apiserver "/CN=kube-apiserver" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.2.2,IP:10.201.0.1,IP:10.0.0.1,IP:$COVI_NODE_IP"
  _testbed_sign "$d" admin "/O=system:masters/CN=covi-admin"
  # The API server's identity towards kubelets (`kubectl logs`, `exec`).
  _testbed_sign "$d" apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  # The garbage collector must read and delete any kind, covi's included.
  _testbed_sign "$d" controller-manager "/O=system:masters/CN=system:kube-controller-manager"
  # The aggregation layer: the API server proxies requests for aggregated APIs (covi's
  # console) with this client certificate, from a CA of its own, and the user's name in
  # X-Remote-* headers that the aggregated server trusts only from that CA.
  openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=covi-testbed-front-proxy-ca" \
    -keyout "$d/front-proxy-ca.key" -out "$d/front-proxy-ca.crt" 2>/dev/null
  CA=front-proxy-ca _testbed_sign "$d" front-proxy-client "/CN=front-proxy-client"
  openssl genrsa -out "$d/sa.key" 2048 2>/dev/null
  openssl rsa -in "$d/sa.key" -pubout -out "$d/sa.pub" 2>/dev/null
}

# _testbed_sign DIR NAME SUBJECT [SUBJECT_ALT_NAMES]: a key and an X.509 v3 certificate
# signed by the CA (DIR/$CA, default ca); a server certificate when SANs are given, else
# a client one.
_testbed_sign() {
  local d=$1 name=$2 subject=$3 sans=${4:-} ext ca=${CA:-ca}
  ext="basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment"
  if [ -n "$sans" ]; then
    ext+=$'\n'"extendedKeyUsage=serverAuth"$'\n'"$sans"
  else
    ext+=$'\n'"extendedKeyUsage=clientAuth"
  fi
  openssl req -newkey rsa:2048 -nodes -subj "$subject" \
    -keyout "$d/$name.key" -out "$d/$name.csr" 2>/dev/null
  openssl x509 -req -in "$d/$name.csr" -CA "$d/$ca.crt" -CAkey "$d/$ca.key" -CAcreateserial \
    -days 7 -out "$d/$name.crt" -extfile <(echo "$ext") 2>/dev/null
}

# testbed_kubeconfig NAME: writes DIR/NAME.kubeconfig for the client certificate NAME.
testbed_kubeconfig() {
  local name=$1 d=$COVI_TESTBED_DIR
  cat >"$d/$name.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: covi-testbed
  cluster:
    server: $COVI_APISERVER
    certificate-authority: $d/certs/ca.crt
users:
- name: $name
  user:
    client-certificate: $d/certs/$name.crt
    client-key: $d/certs/$name.key
contexts:
- name: covi-testbed
  context: {cluster: covi-testbed, user: $name, namespace: default}
current-context: covi-testbed
KC
}

# testbed_user NAME [GROUP...]: a client certificate and kubeconfig for another user,
# for tests that act as requesters, approvers or agents with their own credentials.
testbed_user() {
  local name=$1 subject="" g
  shift
  for g in "$@"; do subject+="/O=$g"; done
  _testbed_sign "$COVI_TESTBED_DIR/certs" "$name" "$subject/CN=$name"
  testbed_kubeconfig "$name"
  echo "$COVI_TESTBED_DIR/$name.kubeconfig"
}

testbed_start() {
  export COVI_TESTBED_DIR=$1
  rm -rf "$COVI_TESTBED_DIR"
  mkdir -p "$COVI_TESTBED_DIR"/{logs,pids,etcd}
  local bin=$CONTROL_PLANE_BIN d=$COVI_TESTBED_DIR
  local etcd_port etcd_peer api_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
  export COVI_APISERVER="https://127.0.0.1:$api_port"

  _testbed_certs "$d/certs"
  local bind=127.0.0.1 advertise=127.0.0.1
  if [ "$(id -u)" = 0 ]; then
    testbed_node_address
    bind=0.0.0.0 advertise=$COVI_NODE_IP
  fi

  _testbed_spawn etcd "$bin/etcd" --data-dir "$d/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
    --initial-cluster "default=http://127.0.0.1:$etcd_peer"

  local extra_args=()
  read -ra extra_args <<<"${COVI_APISERVER_ARGS:-}"
  _testbed_spawn kube-apiserver "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address "$bind" --advertise-address "$advertise" --secure-port "$api_port" \
    --tls-cert-file "$d/certs/apiserver.crt" --tls-private-key-file "$d/certs/apiserver.key" \
    --client-ca-file "$d/certs/ca.crt" \
    --authorization-mode Node,RBAC \
    --kubelet-client-certificate "$d/certs/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$d/certs/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --service-account-issuer "https://kubernetes.default.svc" \
    --service-account-key-file "$d/certs/sa.pub" \
    --service-account-signing-key-file "$d/certs/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true \
    --requestheader-client-ca-file "$d/certs/front-proxy-ca.crt" \
    --requestheader-allowed-names front-proxy-client \
    --requestheader-username-headers X-Remote-User \
    --requestheader-group-headers X-Remote-Group \
    --requestheader-extra-headers-prefix X-Remote-Extra- \
    --proxy-client-cert-file "$d/certs/front-proxy-client.crt" \
    --proxy-client-key-file "$d/certs/front-proxy-client.key" \
    --enable-aggregator-routing=true \
    --enable-admission-plugins NodeRestriction \
    "${extra_args[@]}"

  testbed_kubeconfig admin
  testbed_kubeconfig controller-manager
  export KUBECONFIG="$d/admin.kubeconfig"
  if ! wait_for "kube-apiserver /readyz" 60 "$bin/kubectl" get --raw /readyz; then
    tail -n 30 "$d/logs/kube-apiserver.log" >&2
    return 1
  fi

  # Garbage collection and namespaces for every test; the rest run the node's workloads
  # (tokens' CA in every namespace, Deployments, DaemonSets, Services' endpoints, PDBs,
  # the node's not-ready taint lifted once it is Ready).
  local controllers=garbage-collector-controller,namespace-controller,serviceaccount-controller
  controllers+=,root-ca-certificate-publisher-controller,deployment-controller,replicaset-controller
  controllers+=,daemonset-controller,endpointslice-controller,disruption-controller
  controllers+=,pod-garbage-collector-controller,node-lifecycle-controller
  _testbed_spawn kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$d/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$d/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$d/controller-manager.kubeconfig" \
    --controllers "$controllers" \
    --leader-elect=false --secure-port 0 \
    --service-account-private-key-file "$d/certs/sa.key" \
    --root-ca-file "$d/certs/ca.crt"
  # The controller manager is ready once its garbage collector has synced; its first
  # visible act is creating the default ServiceAccount in a namespace.
  wait_for "kube-controller-manager" 60 "$bin/kubectl" get serviceaccount default -n default
}

testbed_stop() {
  [ "${#_testbed_pids[@]}" -gt 0 ] || return 0
  local others=() libvirt=() pid d i
  # The node's pods first, through the CRI, while kubelet and containerd still run.
  testbed_node_stop
  for (( i=${#_testbed_pids[@]}-1; i>=0; i-- )); do
    pid=${_testbed_pids[$i]}
    if [[ " ${_testbed_libvirt_pids[*]:-} " == *" $pid "* ]]; then libvirt+=("$pid"); else others+=("$pid"); fi
  done
  # Clients first (agents would restart guests), etcd last.
  _testbed_kill "${others[@]}"
  # QEMU guests outlive libvirtd by design: remove every domain of a libvirtd we
  # started, so no guest process is left behind.
  if [ "${#libvirt[@]}" -gt 0 ]; then
    local uri
    for uri in qemu:///system "${_testbed_libvirt_uris[@]}"; do
      for d in $(timeout 10 virsh -c "$uri" list --all --name 2>/dev/null); do
        timeout 10 virsh -c "$uri" destroy "$d" >/dev/null 2>&1 || true
        timeout 10 virsh -c "$uri" undefine --nvram "$d" >/dev/null 2>&1 || true
      done
    done
    _testbed_kill "${libvirt[@]}"
  fi
  [ "$_node_started" = 0 ] || _node_cleanup
  _testbed_pids=()
  _testbed_libvirt_pids=()
  _testbed_libvirt_uris=()
}

# _testbed_kill PID...: TERM, up to 3 s to exit, then KILL.
_testbed_kill() {
  local pid deadline
  [ "$#" -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  deadline=$(( $(date +%s) + 3 ))
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

# testbed_node_xml PATH CPUS MEMORY_GIB: a libvirt test-driver host inventory from
# hack/test-node.xml (the tests fill in the same file).
testbed_node_xml() {
  local path=$1 cpus=$2 mem_gib=$3
  sed -e "s/@CPUS@/$cpus/g" -e "s/@MEMORY_KIB@/$(( mem_gib * 1024 * 1024 ))/" \
    -e "s/@UUID@/$(cat /proc/sys/kernel/random/uuid)/" "$COVI_ROOT/hack/test-node.xml" >"$path"
}

# testbed_spawn_covi NAME COMMAND...: runs a covi binary under the test bed's
# parent-death signal, logging to DIR/logs/NAME.log.
testbed_spawn_covi() {
  _testbed_spawn "$@"
}

# testbed_libvirtd: makes sure a system libvirtd answers on qemu:///system, starting
# virtlogd and libvirtd under the test bed (and stopping them with it) when none runs.
testbed_libvirtd() {
  if timeout 5 virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "testbed: using the libvirtd already running"
  else
    _testbed_spawn virtlogd /usr/sbin/virtlogd
    _testbed_libvirt_pids+=("$!")
    _testbed_spawn libvirtd /usr/sbin/libvirtd
    _testbed_libvirt_pids+=("$!")
    if ! wait_for "libvirtd on qemu:///system" 30 timeout 5 virsh -c qemu:///system version; then
      tail -n 20 "$COVI_TESTBED_DIR/logs/libvirtd.log" >&2
      return 1
    fi
  fi
  export COVI_QEMU_URI=qemu:///system
}

# testbed_libvirt_peers: two more libvirt daemons, hosts a and b of the live-migration
# and disk-lease tests. Each runs in its own mount namespace with its own /run, state,
# configuration and host UUID (libvirt refuses to migrate a guest to the host it runs
# on), and listens on a socket in the test bed folder: COVI_PEER_A_SOCKET,
# COVI_PEER_B_SOCKET. They share this machine's network and every other folder, so a
# folder serves as their shared storage.
#
# Disk leases: each daemon runs its own virtlockd and the lockd lock manager
# (lock_manager = "lockd"), with one lockspace folder shared by both
# (COVI_LOCKSPACE_DIR), as production hosts share one on their storage: a disk a running
# guest holds cannot be started by the other daemon. QEMU's own image lock would refuse
# that second start too, but only because both daemons share one kernel; so that the
# tests see what the lock manager does, COVI_SPLIT_POOL_DIR is a path that each daemon
# sees backed by a folder of its own (a per-namespace bind mount): the same disk path,
# two files, one lease.
# Needs root; without it the tests that need the peers say what is missing.
testbed_libvirt_peers() {
  if [ "$(id -u)" != 0 ]; then
    echo "testbed: not root, so no libvirt peers for the live-migration test"
    return 0
  fi
  local p dir uri cache lockspace=$COVI_TESTBED_DIR/lockspace split=/var/lib/covi-split
  mkdir -p "$lockspace" "$split"
  for p in a b; do
    dir="$COVI_TESTBED_DIR/peer-$p"
    # The QEMU capabilities cache outlives the test bed: probing QEMU takes seconds.
    cache="$COVI_CACHE/libvirt-peers/$p"
    mkdir -p "$dir"/run "$dir"/lib/qemu "$dir"/lib/images "$dir"/etc "$dir"/log/qemu "$dir"/split "$cache"
    cp -a /etc/libvirt/. "$dir/etc/"
    cat >>"$dir/etc/libvirtd.conf" <<CONF
host_uuid = "$(cat /proc/sys/kernel/random/uuid)"
auth_unix_rw = "none"
auth_unix_ro = "none"
CONF
    # No cgroups (both daemons would name their guests' scopes alike), logs to files
    # (no virtlogd in the namespace), guests as root.
    cat >>"$dir/etc/qemu.conf" <<'CONF'
user = "root"
group = "root"
cgroup_controllers = [ ]
stdio_handler = "file"
security_driver = "none"
namespaces = [ ]
lock_manager = "lockd"
CONF
    # Every disk a guest writes gets a lease named after its path, in the shared
    # lockspace; a guest starts only with all its leases.
    cat >"$dir/etc/qemu-lockd.conf" <<CONF
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "$lockspace"
CONF
    # virtlockd first (libvirtd running as root expects it), in the same namespace so
    # its socket is the daemon's /run/libvirt/virtlockd-sock. libvirtd is restarted
    # when it exits, as systemd would (tests restart it under a running agent: kill the
    # pid in DIR/libvirtd.pid; while DIR/libvirtd.hold exists it stays down);
    # virtlockd, and the leases it holds, stay meanwhile.
    _testbed_spawn "libvirtd-peer-$p" unshare -m --propagation private bash -c "
      mount --bind '$dir/run' /run && mount --bind '$dir/lib' /var/lib/libvirt &&
      mount --bind '$dir/etc' /etc/libvirt && mount --bind '$dir/log' /var/log/libvirt &&
      mount --bind '$cache' /var/cache/libvirt && mount --bind '$dir/split' '$split' || exit 1
      mkdir -p /run/libvirt
      setpriv --pdeathsig KILL -- /usr/sbin/virtlockd >'$dir/virtlockd.log' 2>&1 &
      trap 'kill \$(jobs -p) 2>/dev/null; exit 0' TERM
      while :; do
        setpriv --pdeathsig TERM -- /usr/sbin/libvirtd & echo \$! >'$dir/libvirtd.pid'
        wait \$!
        sleep 0.5
        while [ -e '$dir/libvirtd.hold' ]; do sleep 0.1; done
      done"
    _testbed_libvirt_pids+=("$!")
    _testbed_libvirt_uris+=("qemu+unix:///system?socket=$dir/run/libvirt/libvirt-sock")
  done
  # Both start at once (each takes seconds probing the machine); then wait for both.
  for p in a b; do
    uri="qemu+unix:///system?socket=$COVI_TESTBED_DIR/peer-$p/run/libvirt/libvirt-sock"
    if ! wait_for "libvirtd peer $p" 30 timeout 5 virsh -c "$uri" version; then
      tail -n 20 "$COVI_TESTBED_DIR/logs/libvirtd-peer-$p.log" >&2
      return 1
    fi
  done
  export COVI_PEER_A_SOCKET="$COVI_TESTBED_DIR/peer-a/run/libvirt/libvirt-sock"
  export COVI_PEER_B_SOCKET="$COVI_TESTBED_DIR/peer-b/run/libvirt/libvirt-sock"
  export COVI_LOCKSPACE_DIR=$lockspace COVI_SPLIT_POOL_DIR=$split
}

# testbed_qemu_fixtures BRIDGE POOL DIR: what a QEMU host of the lab needs in libvirt:
# a Linux bridge, a transient directory storage pool and a 16 MiB raw image
# (tiny.img, no OS: guests stop in their firmware).
testbed_qemu_fixtures() {
  local bridge=$1 pool=$2 dir=$3
  ip link show "$bridge" >/dev/null 2>&1 || { ip link add "$bridge" type bridge && ip link set "$bridge" up; }
  mkdir -p "$dir"
  virsh -c qemu:///system pool-info "$pool" >/dev/null 2>&1 ||
    virsh -c qemu:///system pool-create-as "$pool" dir --target "$dir" >/dev/null
  virsh -c qemu:///system vol-info --pool "$pool" tiny.img >/dev/null 2>&1 ||
    virsh -c qemu:///system vol-create-as "$pool" tiny.img 16M --format raw >/dev/null
}

# shellcheck source=hack/node.sh
. "$COVI_ROOT/hack/node.sh"
