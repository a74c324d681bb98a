#!/bin/sh
# /init of the PV domU (guest) initramfs built by tests/xen/harness.ts: busybox, xen-blkfront,
# ext4, mke2fs and xvdtest. The guest's kernel command line carries:
#   tapd.mode=MODE   what to do (below; default idle)
#   tapd.dev=NAME    the disk to wait for (default xvda)
#   tapd.seed=N      xvdtest pattern seed (default 1)
#   tapd.wait=SECS   how long to wait for the disk to appear or disappear (default 120)
#   tapd.zero=0      verify without checking that untouched ranges read as zeros
# Output goes to hvc0, which xenconsoled logs in dom0 (/var/log/xen/guest-NAME.log):
#   TAPD-GUEST READY ...            blkfront is loaded: hot-plugging now never stalls
#   TAPD-GUEST STEP ...             progress
#   TAPD-GUEST RESULT ok|fail TEXT  one or more per mode
#   TAPD-GUEST DONE                 just before poweroff
# A mode is a shell function mode_NAME; add one to add a mode.

/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s 2>/dev/null
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp

arg() { # arg NAME DEFAULT: the value of tapd.NAME= on the kernel command line
  # shellcheck disable=SC2013 # the command line is words
  for w in $(cat /proc/cmdline); do
    case $w in "tapd.$1="*) echo "${w#*=}"; return ;; esac
  done
  echo "$2"
}
say() { echo "TAPD-GUEST $*"; }
up() { cut -d" " -f1 /proc/uptime; }
result() { echo "TAPD-GUEST RESULT $*"; }

echo "TAPD-GUEST INIT uptime=$(up)s"
MODE=$(arg mode idle)
DEV=/dev/$(arg dev xvda)
SEED=$(arg seed 1)
WAIT=$(arg wait 120)
NOZERO=
[ "$(arg zero 1)" = 0 ] && NOZERO=--no-zero

# Modules in dependency order, one "name [params]" per line.
while read -r mod params; do
  [ -n "$mod" ] || continue
  # shellcheck disable=SC2086 # params are separate words
  insmod "/lib/modules/$mod.ko" $params || say "STEP insmod $mod failed"
done </lib/modules/load.list

wait_dev() { # wait_dev: until $DEV is a block device with a non-zero size (up to $WAIT s)
  i=0
  while [ "$i" -lt $((WAIT * 5)) ]; do
    if [ -b "$DEV" ] && [ "$(blockdev --getsize64 "$DEV" 2>/dev/null || echo 0)" != 0 ]; then
      say "STEP $DEV appeared ($(blockdev --getsize64 "$DEV") bytes)"
      return 0
    fi
    sleep 0.2
    i=$((i + 1))
  done
  result fail "$MODE: $DEV did not appear within ${WAIT}s"
  return 1
}

wait_gone() { # wait_gone: until $DEV is gone (up to $WAIT s)
  i=0
  while [ "$i" -lt $((WAIT * 5)) ]; do
    if [ ! -b "$DEV" ]; then
      say "STEP $DEV disappeared"
      return 0
    fi
    sleep 0.2
    i=$((i + 1))
  done
  result fail "$MODE: $DEV did not disappear within ${WAIT}s"
  return 1
}

drop_caches() {
  sync
  blockdev --flushbufs "$DEV" 2>/dev/null
  echo 3 >/proc/sys/vm/drop_caches
}

xvd() { # xvd ARGS...: run xvdtest, echo its output, and report its last line as a result
  out=$(xvdtest "$@" 2>&1)
  rc=$?
  echo "$out"
  last=$(echo "$out" | tail -n 1)
  if [ "$rc" = 0 ]; then result ok "$MODE: $last"; else result fail "$MODE: $last"; fi
  return "$rc"
}

mode_idle() {
  say "STEP idle"
  while :; do sleep 3600; done
}

mode_pattern() {
  wait_dev || return
  xvd write "$DEV" --seed "$SEED" || return
  drop_caches
  xvd verify "$DEV" --seed "$SEED" $NOZERO
}

mode_verify() {
  wait_dev || return
  xvd verify "$DEV" --seed "$SEED" $NOZERO
}

mode_mkfs() {
  wait_dev || return
  if ! mkfs.ext4 -F -q "$DEV" >/tmp/mkfs.log 2>&1; then
    result fail "mkfs: mkfs.ext4 failed: $(tail -n 2 /tmp/mkfs.log | tr '\n' ' ')"
    return
  fi
  mount -t ext4 "$DEV" /mnt || { result fail "mkfs: mount failed"; return; }
  echo "hello from a tapd Xen guest" >/mnt/hello.txt
  mkdir -p /mnt/dir
  xvdtest fill /mnt/dir/big.bin 6291456 --seed "$SEED" || { result fail "mkfs: fill failed"; return; }
  i=0
  while [ "$i" -lt 20 ]; do
    echo "small file $i" >"/mnt/dir/small-$i.txt"
    i=$((i + 1))
  done
  sync
  umount /mnt || { result fail "mkfs: umount failed"; return; }
  drop_caches
  mount -t ext4 -o ro "$DEV" /mnt || { result fail "mkfs: remount failed"; return; }
  if [ "$(cat /mnt/hello.txt)" != "hello from a tapd Xen guest" ] ||
    [ "$(cat /mnt/dir/small-19.txt)" != "small file 19" ]; then
    result fail "mkfs: small files read back wrong"
    umount /mnt
    return
  fi
  if xvdtest check /mnt/dir/big.bin 6291456 --seed "$SEED"; then
    result ok "mkfs: ext4 with hello.txt, dir/small-{0..19}.txt, dir/big.bin (6 MiB, seed $SEED) written and read back after a remount"
  else
    result fail "mkfs: dir/big.bin read back wrong"
  fi
  umount /mnt
}

mode_busy() {
  wait_dev || return
  say "STEP busy: writing $DEV until killed"
  xvdtest busy "$DEV" --seed "$SEED"
  result fail "busy: xvdtest exited ($?)"
}

mode_reattach() {
  wait_dev || return
  xvd verify "$DEV" --seed "$SEED" $NOZERO || return
  say "STEP reattach: first attach verified; waiting for $DEV to go"
  wait_gone || return
  wait_dev || return
  drop_caches
  xvd verify "$DEV" --seed "$SEED" $NOZERO
}

mode_bench() { # O_DIRECT dd timings for bench/xen_backends.ts: "BENCH test=seconds ..."
  wait_dev || return
  mib=$(arg mib 16)
  t() { # t COMMAND...: seconds the command took (from /proc/uptime)
    a=$(up)
    "$@" 2>/dev/null || { result fail "bench: $*"; return 1; }
    echo "$a $(up)" | awk '{ printf "%.2f", $2 - $1 }'
  }
  w1=$(t dd if=/dev/zero of="$DEV" bs=1M count="$mib" oflag=direct) || return
  r1=$(t dd if="$DEV" of=/dev/null bs=1M count="$mib" iflag=direct) || return
  w4=$(t dd if=/dev/zero of="$DEV" bs=4k count=$((mib * 64)) oflag=direct) || return
  r4=$(t dd if="$DEV" of=/dev/null bs=4k count=$((mib * 64)) iflag=direct) || return
  say "BENCH write_1m=$w1 read_1m=$r1 write_4k=$w4 read_4k=$r4"
  result ok "bench: ${mib} MiB each"
}

say "READY mode=$MODE dev=$DEV seed=$SEED uptime=$(up)s"
if type "mode_$MODE" >/dev/null 2>&1; then
  "mode_$MODE"
else
  result fail "unknown mode $MODE"
fi
say DONE
sync
sleep 1 # let xenconsoled drain the console ring before the domain goes away
poweroff -f
