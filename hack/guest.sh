#!/usr/bin/env bash
# The test guest: a Debian kernel and a static busybox initramfs, small enough to boot
# under QEMU/TCG in seconds, that does what a test asks on its kernel command line.
#
#   hack/guest.sh [DIR]
#       Makes DIR/vmlinuz and DIR/initrd.img (default .cache/guest/<key>/), once: the
#       kernel from Debian's linux-image-amd64, busybox from busybox-static, both fetched
#       with apt-get download (no package is installed). Prints DIR.
#
# The guest's /init reads `covi.guest=` from the command line (comma-separated):
#   burn    spins one shell loop per vCPU (a CPU-bound workload)
#   idle    does nothing (the default)
#   net     loads virtio-net and configures eth0 with covi.address= (ADDR/PREFIX) and
#           covi.gateway=, which covi puts on the command line of kernel-booted guests
#   shell   runs every line typed on the console as a shell command (ping a peer,
#           send to it), ending its output with `guest done: rc=N`
# and always: prints `COVI-GUEST-UP hostname=<covi.hostname>` on the console, then
# reads lines from the console and answers each with `guest got: LINE`, so a test can
# type into the serial console and read the answer back. Boot it with console=ttyS0
# (HVM) or console=hvc0 (Xen PV).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

KEY=$(sha256sum "$0" | cut -c1-12)
DIR=${1:-$COVI_CACHE/guest/$KEY}
if [ -f "$DIR/vmlinuz" ] && [ -f "$DIR/initrd.img" ]; then
  echo "$DIR"
  exit 0
fi
mkdir -p "$DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(
  cd "$work"
  # The metapackage names the kernel package of the day; download that one.
  kernel_pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
  [ -n "$kernel_pkg" ] || { echo "guest: apt knows no linux-image-amd64 (run apt-get update)" >&2; exit 1; }
  apt-get download -q "$kernel_pkg" busybox-static >apt.log 2>&1 || { cat apt.log >&2; exit 1; }
  dpkg-deb -x linux-image-*.deb kernel
  dpkg-deb -x busybox-static_*.deb busybox
) >&2
cp "$(ls "$work"/kernel/boot/vmlinuz-* | head -n 1)" "$work/vmlinuz"

root=$work/root
mkdir -p "$root"/bin "$root"/proc "$root"/sys "$root"/dev "$root"/tmp "$root"/lib/modules
cp "$work/busybox/bin/busybox" "$root/bin/busybox"
for applet in sh mount cat sleep grep sed tr insmod ip ping nc echo date; do ln -s busybox "$root/bin/$applet"; done
# virtio-net and what it needs, in load order (Debian builds them as modules).
NET_MODULES="virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci failover net_failover virtio_net"
for m in $NET_MODULES; do
  cp "$(find "$work"/kernel/lib/modules -name "$m.ko" | head -n 1)" "$root/lib/modules/$m.ko"
done
cat >"$root/init" <<'INIT'
#!/bin/busybox sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev 2>/dev/null
cmdline=$(cat /proc/cmdline)
arg() { for w in $cmdline; do case $w in "$1"=*) echo "${w#*=}";; esac; done; }
host=$(arg covi.hostname)
modes=$(arg covi.guest | tr , ' ')
cpus=$(grep -c ^processor /proc/cpuinfo)
for mode in $modes; do
  case $mode in
    burn)
      i=0
      while [ "$i" -lt "$cpus" ]; do (while :; do :; done) & i=$((i + 1)); done ;;
    net)
      for m in @NET_MODULES@; do insmod "/lib/modules/$m.ko"; done
      ip link set lo up
      ip link set eth0 up
      address=$(arg covi.address)
      gateway=$(arg covi.gateway)
      [ -n "$address" ] && ip addr add "$address" dev eth0
      [ -n "$gateway" ] && ip route add default via "$gateway"
      echo "COVI-GUEST-NET address=${address:-none}" ;;
    shell) shell=1 ;;
  esac
done
echo "COVI-GUEST-UP hostname=${host:-unknown} modes=[${modes:-idle}] cpus=$cpus"
while :; do
  while read -r line; do
    echo "guest got: $line"
    if [ -n "${shell:-}" ]; then
      sh -c "$line"
      echo "guest done: rc=$?"
    fi
  done </dev/console >/dev/console 2>&1
  sleep 1
done
INIT
sed -i "s/@NET_MODULES@/$NET_MODULES/" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | sort | cpio -o -H newc --quiet --reproducible | gzip -9n) >"$work/initrd.img"
mv "$work/vmlinuz" "$work/initrd.img" "$DIR/"
echo "guest: built in $DIR ($(du -sh "$DIR" | cut -f1))" >&2
echo "$DIR"
