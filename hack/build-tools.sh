#!/usr/bin/env bash
# Builds the tools the tests run, from their Go modules (cached; a second run costs
# milliseconds):
#   helm          helm.sh/helm/v3 at HELM_VERSION (hack/versions.env): helm lint/template,
#                 and install onto the test bed's node
#   crictl        sigs.k8s.io/cri-tools at CRICTL_VERSION: the node's pods through the CRI
#   covi-kstatus  hack/kstatus, Flux's kstatus library (sigs.k8s.io/cli-utils) on live objects
set -euo pipefail
. "$(dirname "$0")/lib.sh"

export GOFLAGS="-buildvcs=false"
# Go's build cache is worth nothing once the binaries are cached (keyed by version):
# it lives in .cache for this build only and goes with it, gigabytes a fresh machine
# (and CI, whose disk may be nearly full) does not keep.
export GOCACHE="$COVI_CACHE/go-build-$$"
trap 'rm -rf "$GOCACHE"' EXIT
export CGO_ENABLED=0
mkdir -p "$TOOLS_BIN"

if [ ! -x "$TOOLS_BIN/helm" ]; then
  echo "build-tools: building helm ${HELM_VERSION}"
  GOBIN="$TOOLS_BIN" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" \
    "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
fi

if [ ! -x "$TOOLS_BIN/crictl-${CRICTL_VERSION}" ]; then
  echo "build-tools: building crictl ${CRICTL_VERSION}"
  GOBIN="$TOOLS_BIN/crictl-build" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/cri-tools/cmd/crictl@${CRICTL_VERSION}"
  mv "$TOOLS_BIN/crictl-build/crictl" "$TOOLS_BIN/crictl-${CRICTL_VERSION}"
  rmdir "$TOOLS_BIN/crictl-build"
fi
ln -sf "crictl-${CRICTL_VERSION}" "$TOOLS_BIN/crictl"

# covi-kstatus is our own program: rebuilt whenever its sources change.
src="$COVI_ROOT/hack/kstatus"
key=$(cat "$src/go.mod" "$src/go.sum" "$src/main.go" | sha256sum | cut -c1-12)
if [ ! -x "$TOOLS_BIN/covi-kstatus-$key" ]; then
  echo "build-tools: building covi-kstatus"
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$TOOLS_BIN/covi-kstatus-$key" .)
fi
ln -sf "covi-kstatus-$key" "$TOOLS_BIN/covi-kstatus"
echo "build-tools: helm, crictl and covi-kstatus in $TOOLS_BIN"
