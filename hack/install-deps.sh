#!/usr/bin/env bash
# Installs the Debian packages covi's build and tests need: libvirt 11 and QEMU 10
# from bookworm-backports (the agent links against libvirt; tests use its test driver
# and libvirtd with QEMU/TCG), virtlockd and its lockd plugin (disk leases on the test
# bed's libvirt peers), containerd, runc and the CNI plugins (the test bed's node), plus
# the small tools the test bed uses.
# Idempotent: a second run with everything present costs about a second.
#
# Usage: install-deps.sh [--no-guests]
#   --no-guests  only what building and libvirt's test driver need: no libvirtd, no
#                QEMU, no virtlockd, no guest-image tools, no node (hack/test.sh passes it when
#                every test asked for runs on the test driver).
set -euo pipefail

guests=1
for arg in "$@"; do
  case "$arg" in
    --no-guests) guests=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-deps: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done

packages=(pkg-config libvirt-dev
  openssl curl jq iproute2 iptables nftables xorriso libxml2-utils lua5.4 socat e2fsprogs)
if [ "$guests" = 1 ]; then
  packages+=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients
    qemu-system-x86 qemu-utils libvirt-daemon-lock libvirt-daemon-plugin-lockd debootstrap cpio
    containerd runc containernetworking-plugins conntrack)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# libvirt must come from backports (11.x): the 9.0 in bookworm lacks APIs we rely on.
libvirt_major=$(dpkg-query -W -f='${Version}' libvirt-dev 2>/dev/null | cut -d. -f1 || true)
if [ "${#missing[@]}" -eq 0 ] && [ "${libvirt_major:-0}" -ge 11 ]; then
  echo "install-deps: all packages present (libvirt-dev ${libvirt_major}.x)"
  exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ] && \
   ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "install-deps: adding bookworm-backports to apt sources"
  $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
target=()
[ "${VERSION_CODENAME:-}" = bookworm ] && target=(-t bookworm-backports)


$SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${packages[@]}" >/dev/null
echo "install-deps: done ($(dpkg-query -W -f='${Version}' libvirt-dev))"
