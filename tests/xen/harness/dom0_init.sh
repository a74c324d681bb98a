#!/bin/sh
# /init of the Xen dom0 initramfs built by tests/xen/harness.ts (busybox, Xen 4.17 tools, host
# libraries, a few kernel modules, the domU kernel and initramfs under /boot).
# Mounts the repo (9p, read-only) at /mnt/repo and the run's work dir (9p, read-write) at
# /mnt/work, starts xenstored, xen-init-dom0 and xenconsoled, then runs the test's dom0 script
# (/mnt/work/dom0.sh) with tests/xen/harness/lib.sh sourced, prints
#   TAPD-DOM0 DONE status=N
# and powers the machine off. Other markers: TAPD-DOM0 INIT, TAPD-DOM0 READY, TAPD-DOM0 ERROR.

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt/repo /mnt/work /root
/bin/busybox --install -s 2>/dev/null
export PATH=/usr/lib/xen-4.17/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "TAPD-DOM0 INIT $(cut -d' ' -f1 /proc/uptime)s"
ldconfig # /etc/ld.so.cache, for `ldconfig -p` checks (./tapd looks for libaio and liburing)

fail() {
  echo "TAPD-DOM0 ERROR $*"
  echo "TAPD-DOM0 DONE status=125"
  sync
  poweroff -f
  sleep 60
}

while read -r mod params; do
  [ -n "$mod" ] || continue
  # shellcheck disable=SC2086 # params are separate words
  insmod "/lib/modules/$mod.ko" $params || echo "TAPD-DOM0 insmod $mod failed"
done </lib/modules/load.list

mkdir -p /proc/xen
echo "TAPD-DOM0 T modules $(cut -d' ' -f1 /proc/uptime)"
mount -t xenfs xenfs /proc/xen || fail "mount xenfs"
NINEP=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o "$NINEP,ro,cache=loose" repo /mnt/repo || fail "mount 9p repo"
mount -t 9p -o "$NINEP" work /mnt/work || fail "mount 9p work"
[ -f /mnt/work/harness.env ] || fail "no /mnt/work/harness.env"
# shellcheck disable=SC1091
. /mnt/work/harness.env

# The host's path of the repo points at the share too (absolute links such as
# node_modules/.bin/deno keep working).
TAPD_HOST_REPO=${TAPD_HOST_REPO%/}
if [ -n "${TAPD_HOST_REPO:-}" ] && [ "$TAPD_HOST_REPO" != /mnt/repo ] && [ ! -e "$TAPD_HOST_REPO" ]; then
  mkdir -p "$(dirname "$TAPD_HOST_REPO")" && ln -s /mnt/repo "$TAPD_HOST_REPO"
fi

echo "TAPD-DOM0 T mounts $(cut -d' ' -f1 /proc/uptime)"
mkdir -p /var/run/xen /var/run/xenstored /var/log/xen /var/lib/xen /var/lib/xenstored
xenstored --pid-file /var/run/xenstored.pid || fail "xenstored"
i=0
while [ ! -S /var/run/xenstored/socket ] && [ "$i" -lt 100 ]; do
  sleep 0.1
  i=$((i + 1))
done
echo "TAPD-DOM0 T xenstored $(cut -d' ' -f1 /proc/uptime)"
xen-init-dom0 >/tmp/xen-init-dom0.log 2>&1 || {
  cat /tmp/xen-init-dom0.log
  fail "xen-init-dom0"
}
echo "TAPD-DOM0 T init-dom0 $(cut -d' ' -f1 /proc/uptime)"
xenconsoled --log=guest --log-dir=/var/log/xen --pid-file=/var/run/xenconsoled.pid ||
  fail "xenconsoled"

export DENO=/mnt/repo/toolchain/node_modules/@deno/linux-x64-glibc/deno
export DENO_DIR=/tmp/deno DENO_NO_UPDATE_CHECK=1 NO_COLOR=1
export TAPD_LIB=/mnt/repo/tests/xen/harness/lib.sh
mkdir -p "$DENO_DIR"
if [ -f /mnt/work/.deno-dir.tar ]; then
  tar -C "$DENO_DIR" -xf /mnt/work/.deno-dir.tar 2>/dev/null || rm -rf "${DENO_DIR:?}"/*
fi
echo "TAPD-DOM0 READY $(cut -d' ' -f1 /proc/uptime)s"

touch /mnt/work/guests.sh
(cd /mnt/work && sh -c '. "$TAPD_LIB" && . /mnt/work/guests.sh && . /mnt/work/dom0.sh' dom0.sh)
status=$?
if [ "$status" != 0 ]; then
  echo "TAPD-DOM0 script failed ($status): state for debugging follows"
  xl list 2>&1
  for f in /var/log/xen/guest-*.log; do
    [ -f "$f" ] || continue
    name=${f#/var/log/xen/guest-}
    name=${name%.log}
    echo "TAPD-DOM0 console of guest $name (prefix [dump $name], not counted as results):"
    tr -d '\r' <"$f" | sed "s/^/[dump $name] /"
  done
  xl dmesg 2>&1 | tail -n 20
fi
# Hand DENO_DIR back to the host for the next run (not while a deno still runs: its sqlite caches
# could be caught half-written).
if [ "$status" = 0 ] && [ "${TAPD_DENO_CACHE:-1}" = 1 ] && [ -n "$(ls "$DENO_DIR")" ] &&
  ! pidof deno >/dev/null; then
  tar -C "$DENO_DIR" -cf /mnt/work/.deno-dir.tar.new . 2>/dev/null
fi
echo "TAPD-DOM0 DONE status=$status uptime=$(cut -d' ' -f1 /proc/uptime)s"
sync
poweroff -f
sleep 60
