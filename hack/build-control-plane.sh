#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl at the versions in
# hack/versions.env from their Go modules (the module proxy is the only source we
# have; no release tarballs), and the test bed node's kubelet, kube-proxy and
# kube-scheduler from the same Kubernetes module. Binaries land in a folder keyed by
# version, so a second run is a no-op that costs milliseconds; a missing binary alone
# is built when the others are there.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

kube=(kube-apiserver kube-controller-manager kubectl kubelet kube-proxy kube-scheduler)
want=(etcd "${kube[@]}")
have_all=1
for b in "${want[@]}"; do [ -x "$CONTROL_PLANE_BIN/$b" ] || have_all=0; done
if [ "$have_all" = 1 ]; then
  echo "build-control-plane: cached in $CONTROL_PLANE_BIN"
  exit 0
fi

export GOFLAGS="-buildvcs=false -mod=mod"
# Go's build cache is worth nothing once the binaries are cached (keyed by version):
# it lives in .cache for this build only and goes with it, gigabytes a fresh machine
# (and CI, whose disk may be nearly full) does not keep.
export GOCACHE="$COVI_CACHE/go-build-$$"
trap 'rm -rf "$GOCACHE"' EXIT
export CGO_ENABLED=0
work="$COVI_CACHE/control-plane/src"
mkdir -p "$work/kubernetes" "$work/etcd" "$CONTROL_PLANE_BIN"

# k8s.io/kubernetes points its staging modules at ./staging in its own go.mod; as a
# dependency those replaces are ignored, so we name each at the matching v0 tag.
k8s_minor="${KUBERNETES_VERSION#v1.}"
staging_version="v0.${k8s_minor}"
missing=()
for b in "${kube[@]}"; do [ -x "$CONTROL_PLANE_BIN/$b" ] || missing+=("$b"); done
if [ "${#missing[@]}" -gt 0 ]; then
  cd "$work/kubernetes"
  go mod download -json "k8s.io/kubernetes@${KUBERNETES_VERSION}" >/dev/null
  gomod="$(go env GOMODCACHE)/cache/download/k8s.io/kubernetes/@v/${KUBERNETES_VERSION}.mod"
  {
    echo "module covi.io/hack/control-plane"
    echo
    echo "go $(awk '/^go /{print $2; exit}' "$gomod")"
    echo
    echo "require k8s.io/kubernetes ${KUBERNETES_VERSION}"
    echo
    echo "replace ("
    awk '/=> \.\/staging\/src\//{print "\t" $1 " => " $1 " '"$staging_version"'"}' "$gomod"
    echo ")"
  } > go.mod
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
GO
  echo "build-control-plane: resolving k8s.io/kubernetes ${KUBERNETES_VERSION} modules"
  go mod tidy -e >/dev/null 2>&1 || true
  for b in "${missing[@]}"; do
    echo "build-control-plane: building $b"
    go build -tags tools -trimpath -ldflags "-s -w \
      -X k8s.io/component-base/version.gitVersion=${KUBERNETES_VERSION} \
      -X k8s.io/component-base/version.gitMajor=1 \
      -X k8s.io/component-base/version.gitMinor=${k8s_minor%%.*} \
      -X k8s.io/client-go/pkg/version.gitVersion=${KUBERNETES_VERSION}" \
      -o "$CONTROL_PLANE_BIN/$b.tmp" "k8s.io/kubernetes/cmd/$b"
    mv "$CONTROL_PLANE_BIN/$b.tmp" "$CONTROL_PLANE_BIN/$b"
  done
fi

if [ ! -x "$CONTROL_PLANE_BIN/etcd" ]; then
  cd "$work/etcd"
  cat > go.mod <<GOMOD
module covi.io/hack/etcd

go 1.24

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
GOMOD
  cat > tools.go <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  echo "build-control-plane: building etcd ${ETCD_VERSION}"
  go mod tidy -e >/dev/null 2>&1 || true
  go build -tags tools -trimpath -ldflags "-s -w" -o "$CONTROL_PLANE_BIN/etcd.tmp" go.etcd.io/etcd/server/v3
  mv "$CONTROL_PLANE_BIN/etcd.tmp" "$CONTROL_PLANE_BIN/etcd"
fi
echo "build-control-plane: built into $CONTROL_PLANE_BIN"
