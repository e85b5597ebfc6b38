# Shared by the hack/ scripts: paths and a phase timer. Source it, don't run it.
COVI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=hack/versions.env
. "$COVI_ROOT/hack/versions.env"
export KUBERNETES_VERSION
COVI_CACHE="${COVI_CACHE:-$COVI_ROOT/.cache}"
CONTROL_PLANE_BIN="$COVI_CACHE/control-plane/k8s-${KUBERNETES_VERSION}-etcd-${ETCD_VERSION}/bin"
TOOLS_BIN="$COVI_CACHE/tools/helm-${HELM_VERSION}/bin"

_phase_start=0
_phase_name=""
# phase NAME: ends the running phase (printing its duration) and starts NAME.
phase() {
  local now
  now=$(date +%s.%N)
  if [ -n "$_phase_name" ]; then
    # With the disk space left: a build that fails to link on a nearly full disk says so.
    printf '[time] %-28s %6.1fs  (%s free)\n' "$_phase_name" "$(awk -v a="$_phase_start" -v b="$now" 'BEGIN{print b-a}')" \
      "$(df -h --output=avail "$COVI_ROOT" 2>/dev/null | tail -n 1 | tr -d ' ')" >&2
  fi
  _phase_name="${1:-}"
  _phase_start=$now
}

# The pinned kubectl comes first, so no other kubectl on the machine answers instead.
export PATH="$CONTROL_PLANE_BIN:$TOOLS_BIN:$PATH"
