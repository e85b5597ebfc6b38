#!/usr/bin/env bash
# The Xen lab: a real Xen 4.17 hypervisor with a Debian 12 dom0, booted under QEMU/TCG
# (no KVM), where covi-agent converges domains through libvirt's Xen driver (libxl).
# See ../shared/XEN-LAB.md for the facts this follows.
#
#   hack/xen-lab.sh image
#       Builds dom0's root file system once (debootstrap, Xen, libvirt 11 from
#       bookworm-backports to match the agent's build, QEMU as the PV disk backend),
#       cached in .cache/xen-lab/<key>/ (the key covers this script and the package set).
#   hack/xen-lab.sh boot DIR
#       Makes DIR/dom0.img from the cached root, the freshly built covi-agent and the
#       files in DIR/etc-covi/ (kubeconfig, agent.env, node), then becomes QEMU running
#       Xen (in the foreground): its pid in DIR/qemu.pid, its serial console (dom0's
#       console) in DIR/serial.log, its monitor at DIR/monitor.sock.
#   hack/xen-lab.sh stop DIR
#       Powers the lab off (QEMU quits) and waits for the process to end.
#
# dom0's PID 1 (written below) starts the Xen daemons, libvirtd and the agent, then
# prints `xl list` and every guest console log to its console every few seconds between
# COVI-LAB markers, which is how tests look inside.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

XEN_VERSION=4.17
MIRROR=http://deb.debian.org/debian
BASE_PACKAGES=(xen-hypervisor-4.17-amd64 xen-utils-4.17 qemu-system-xen linux-image-amd64
  iproute2 procps kmod xorriso ca-certificates)
LIBVIRT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-xen libvirt-daemon-driver-storage libvirt-clients)

unmount_chroot() {
  local m
  for m in dev sys proc; do umount -l "$ROOTFS/$m" 2>/dev/null || true; done
}

image() {
  if [ -f "$LAB_CACHE/done" ]; then
    echo "xen-lab: dom0 root cached in $LAB_CACHE"
    return 0
  fi
  [ "$(id -u)" = 0 ] || { echo "xen-lab: building the dom0 image needs root" >&2; return 1; }
  rm -rf --one-file-system "$COVI_CACHE/xen-lab"
  mkdir -p "$ROOTFS"
  echo "xen-lab: debootstrap bookworm"
  debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR" >"$LAB_CACHE/debootstrap.log" 2>&1 ||
    { tail -n 20 "$LAB_CACHE/debootstrap.log" >&2; return 1; }
  echo "deb $MIRROR bookworm-backports main" >"$ROOTFS/etc/apt/sources.list.d/backports.list"
  # No service may start inside the chroot.
  printf '#!/bin/sh\nexit 101\n' >"$ROOTFS/usr/sbin/policy-rc.d"
  chmod +x "$ROOTFS/usr/sbin/policy-rc.d"
  # The chroot gets its own /proc, a read-only /sys and a /dev of its own with the few
  # nodes apt needs: package scripts must not touch the host's devices (a postinst
  # once re-grouped the host's /dev/kvm, which made libvirtd re-probe QEMU at every start).
  mount -t proc proc "$ROOTFS/proc"
  mount -t sysfs -o ro sysfs "$ROOTFS/sys"
  mount -t tmpfs -o mode=755 dev "$ROOTFS/dev"
  mknod -m 666 "$ROOTFS/dev/null" c 1 3
  mknod -m 666 "$ROOTFS/dev/zero" c 1 5
  mknod -m 666 "$ROOTFS/dev/full" c 1 7
  mknod -m 666 "$ROOTFS/dev/random" c 1 8
  mknod -m 666 "$ROOTFS/dev/urandom" c 1 9
  trap 'unmount_chroot' RETURN
  echo "xen-lab: installing Xen, the kernel and libvirt into dom0"
  {
    chroot "$ROOTFS" apt-get update -qq &&
      chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${BASE_PACKAGES[@]}" &&
      chroot "$ROOTFS" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -t bookworm-backports "${LIBVIRT_PACKAGES[@]}"
  } >"$LAB_CACHE/apt.log" 2>&1 || { tail -n 30 "$LAB_CACHE/apt.log" >&2; return 1; }
  chroot "$ROOTFS" apt-get clean
  unmount_chroot
  rm -f "$ROOTFS/usr/sbin/policy-rc.d"
  # The monolithic libvirtd would also load its QEMU driver, which dies without a
  # libvirt-qemu user and takes libvirtd down: the lab has no use for it.
  rm -f "$ROOTFS"/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so
  # TCG lacks the vme CPU feature that every x86 model in libvirt's CPU map requires,
  # so the Xen driver finds no host CPU model: declare one it can use.
  cat >"$ROOTFS/usr/share/libvirt/cpu_map/x86_covi-tcg.xml" <<'XML'
<cpus>
  <model name='covi-tcg'>
    <decode host='on' guest='off'/>
    <feature name='fpu'/>
    <feature name='pse'/>
  </model>
</cpus>
XML
  sed -i "s|<include filename='x86_486.xml'/>|&\n      <include filename='x86_covi-tcg.xml'/>|" \
    "$ROOTFS/usr/share/libvirt/cpu_map/index.xml"
  grep -q covi-tcg "$ROOTFS/usr/share/libvirt/cpu_map/index.xml"
  touch "$LAB_CACHE/done"
  echo "xen-lab: dom0 root ready ($(du -sh "$ROOTFS" | cut -f1))"
}

# The guest's initramfs: a static /init that prints a marker with the kernel command
# line (where covi puts the host name), then idles.
guest_initrd() {
  local out=$1 work
  work=$(mktemp -d)
  cat >"$work/init.c" <<'C'
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <unistd.h>
int main(void) {
  char cmdline[4096] = {0};
  mount("proc", "/proc", "proc", 0, "");
  int fd = open("/proc/cmdline", O_RDONLY);
  if (fd >= 0) { read(fd, cmdline, sizeof cmdline - 1); close(fd); }
  cmdline[strcspn(cmdline, "\n")] = 0;
  const char *h = strstr(cmdline, "hostname=");
  char host[256] = "unknown";
  if (h) { sscanf(h + 9, "%255s", host); }
  for (;;) {
    printf("COVI-GUEST-UP hostname=%s cmdline=[%s]\n", host, cmdline);
    fflush(stdout);
    sleep(5);
  }
}
C
  gcc -static -O2 -o "$work/init" "$work/init.c"
  mkdir -p "$work/root/proc" "$work/root/dev"
  cp "$work/init" "$work/root/init"
  (cd "$work/root" && find . | cpio -o -H newc --quiet | gzip -9) >"$out"
  rm -rf "$work"
}

boot() {
  local dir=$1 agent img
  [ -f "$LAB_CACHE/done" ] || image
  agent="${COVI_BIN_DIR:-$COVI_ROOT/target/debug}/covi-agent"
  [ -x "$agent" ] || { echo "xen-lab: $agent is missing: build it first" >&2; return 1; }
  [ -f "$dir/etc-covi/kubeconfig" ] && [ -f "$dir/etc-covi/agent.env" ] ||
    { echo "xen-lab: $dir/etc-covi needs kubeconfig and agent.env" >&2; return 1; }
  local stage="$dir/stage"
  rm -rf "$stage"
  mkdir -p "$stage/etc/covi" "$stage/usr/local/bin" "$stage/var/lib/covi"
  cp "$dir/etc-covi/"* "$stage/etc/covi/"
  cp "$agent" "$stage/usr/local/bin/covi-agent"
  guest_initrd "$stage/var/lib/covi/guest-initrd.img"
  cat >"$stage/sbin-covi-init" <<'INIT'
#!/bin/sh
# dom0's PID 1 in the covi Xen lab.
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs run /run
mkdir -p /run/lock /run/xen /var/log/xen/console /var/lib/xen /var/log/libvirt /var/lib/covi-agent
# No udev here: load the drivers dom0 needs by hand (the NIC's included).
for m in virtio_net xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback bridge loop; do
  modprobe "$m" 2>/dev/null
done
mount -t xenfs xenfs /proc/xen
hostname "$(cat /etc/covi/node 2>/dev/null || echo dom0)"
xenstored --pid-file=/run/xenstored.pid
xen-init-dom0
xenconsoled --log=guest --log-dir=/var/log/xen/console
ip link set lo up
# QEMU's user network; the initramfs's udev may have renamed eth0 (enp0s2).
nic=$(ls /sys/class/net | grep -v -x -e lo | head -n 1)
ip link set "$nic" up && ip addr add 10.0.2.15/24 dev "$nic" && ip route add default via 10.0.2.2
ip link add xenbr0 type bridge && ip link set xenbr0 up
# The pool's storage: a folder pool with the catalog's (empty) boot volume.
mkdir -p /var/lib/covi/pool
truncate -s 64M /var/lib/covi/pool/boot.img
# The guests boot dom0's own kernel (Debian's kernel runs as a PV guest too).
cp "$(ls /boot/vmlinuz-* | head -n 1)" /var/lib/covi/guest-vmlinuz
# Restarted when it exits, as Debian's libvirtd.service (Restart=on-failure) would; each
# exit is reported on the console with the last lines of its log.
while :; do
  libvirtd >>/var/log/libvirt/libvirtd.log 2>&1
  echo "COVI-LAB libvirtd exited with $?; restarting it. Its log ends:"
  tail -n 15 /var/log/libvirt/libvirtd.log | sed 's|^|COVI-LAB-LIBVIRTD: |'
  sleep 1
done &
up=0
for i in $(seq 1 60); do
  if timeout 5 virsh -c xen:///system version >/dev/null 2>&1; then up=1; break; fi
  sleep 1
done
if [ "$up" = 1 ]; then
  echo "COVI-LAB libvirtd up: $(virsh -c xen:///system version | tr '\n' ' ')"
  virsh -c xen:///system pool-create-as covi dir --target /var/lib/covi/pool >/dev/null
  set -a; . /etc/covi/agent.env; set +a
  # Restarted when it exits, as a DaemonSet would.
  while :; do
    covi-agent --libvirt-uri xen:///system --kubeconfig /etc/covi/kubeconfig --address 10.0.2.15 \
      --metrics-addr 0.0.0.0:9464 --work-dir /var/lib/covi-agent $COVI_AGENT_ARGS
    sleep 2
  done >>/var/log/covi-agent.log 2>&1 &
  echo "COVI-LAB agent started"
else
  echo "COVI-LAB libvirtd did not start:"; tail -n 20 /var/log/libvirt/libvirtd.log
fi
# Every 5 s: dom0's own pulse (so a silent console tells a hung dom0 from a slow one),
# xl list (bounded: it reads names from xenstore, which can block), the guests'
# consoles and the agent's last lines. When xl list does not answer, Xen's own log.
while :; do
  echo "COVI-LAB-DOM0 up $(cut -d' ' -f1 /proc/uptime)s load $(cut -d' ' -f1-3 /proc/loadavg) free $(awk '/MemAvailable/ {print $2}' /proc/meminfo)kB"
  echo "COVI-LAB-XL-BEGIN"
  if ! timeout 20 xl list 2>&1; then
    echo "COVI-LAB xl list did not answer in 20 s; xl dmesg:"
    timeout 10 xl dmesg 2>&1 | tail -n 15
  fi
  echo "COVI-LAB-XL-END"
  for f in /var/log/xen/console/guest-*.log; do
    [ -f "$f" ] && sed "s|^|COVI-LAB-CONSOLE $(basename "$f"): |" "$f"
  done
  tail -n 3 /var/log/covi-agent.log 2>/dev/null | sed 's|^|COVI-LAB-AGENT: |'
  sleep 5
done
INIT
  chmod +x "$stage/sbin-covi-init"
  echo "xen-lab: making dom0.img"
  img="$dir/dom0.img"
  rm -f "$img"
  # The cached root plus this run's files, as one ext4 image (about 3 s).
  local merged="$dir/root"
  rm -rf "$merged"
  cp -a --reflink=auto "$ROOTFS" "$merged"
  cp -a "$stage/etc/covi" "$merged/etc/"
  cp "$stage/usr/local/bin/covi-agent" "$merged/usr/local/bin/"
  mkdir -p "$merged/var/lib/covi"
  cp "$stage/var/lib/covi/guest-initrd.img" "$merged/var/lib/covi/"
  cp "$stage/sbin-covi-init" "$merged/sbin/covi-init"
  mkfs.ext4 -q -F -d "$merged" "$img" 3G
  rm -rf "$merged" "$stage"
  local kernel initrd
  kernel=$(ls "$ROOTFS"/boot/vmlinuz-* | head -n 1)
  initrd=$(ls "$ROOTFS"/boot/initrd.img-* | head -n 1)
  zcat "$ROOTFS/boot/xen-$XEN_VERSION-amd64.gz" >"$dir/xen" 2>/dev/null || cp "$ROOTFS"/boot/xen-"$XEN_VERSION"-amd64* "$dir/xen"
  echo "xen-lab: booting Xen under QEMU/TCG (serial: $dir/serial.log)"
  # In the foreground: whoever runs `boot` owns QEMU (the tests give it a parent-death
  # signal, so the lab never outlives them).
  # One CPU: a run is faster (80 s against 122 s with two). dom0's clock is Xen's from
  # the start (clocksource=xen): left to choose, Linux took the TSC, its watchdog found
  # TCG's TSC skewed against Xen's clock about 34 s in and switched to xen, and a few
  # seconds later (as the guest was created) dom0 stopped for good: QEMU's monitor showed
  # the CPU looping in one dom0 process, as if no timer preempted it any more. With Xen's
  # clock from the start, three runs in a row passed (the hang was about one run in three).
  exec qemu-system-x86_64 -accel tcg -machine q35 -m 2048 -smp 1 -cpu max \
    -nographic -no-reboot -serial "file:$dir/serial.log" -monitor "unix:$dir/monitor.sock,server,nowait" \
    -kernel "$dir/xen" -append "dom0_mem=1024M,max:1024M dom0_max_vcpus=1 console=com1 com1=115200,8n1" \
    -initrd "$kernel root=/dev/vda rw init=/sbin/covi-init console=hvc0 clocksource=xen earlyprintk=xen,$initrd" \
    -drive "file=$img,if=virtio,format=raw,cache=unsafe" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -pidfile "$dir/qemu.pid"
}

stop() {
  local dir=$1 pid
  pid=$(cat "$dir/qemu.pid" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  # Quit through the monitor; kill if it does not answer.
  if command -v socat >/dev/null && [ -S "$dir/monitor.sock" ]; then
    echo quit | timeout 5 socat - "UNIX-CONNECT:$dir/monitor.sock" >/dev/null 2>&1 || true
  fi
  local i
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/qemu.pid"
  echo "xen-lab: off"
}

# The cache key: the image recipe (the two functions above) and the package set, so
# that changing dom0's PID 1 or the boot options does not rebuild the image.
key=$( { declare -f image unmount_chroot; echo "${BASE_PACKAGES[*]} ${LIBVIRT_PACKAGES[*]}"; } | sha256sum | cut -c1-12)
LAB_CACHE="$COVI_CACHE/xen-lab/$key"
ROOTFS="$LAB_CACHE/rootfs"

case "${1:-}" in
  image) image ;;
  boot) boot "${2:?usage: xen-lab.sh boot DIR}" ;;
  stop) stop "${2:?usage: xen-lab.sh stop DIR}" ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
