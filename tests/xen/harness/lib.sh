# Helpers for Xen harness dom0 scripts (tests/xen/harness.ts runXen; docs/xen-harness.md).
# Sourced before the test's script, which runs in /mnt/work with busybox sh (POSIX; bash is also
# there). Guest consoles are logged by xenconsoled in /var/log/xen/guest-NAME.log. Timeouts are
# in seconds.
#
# Environment: DENO (the deno binary on the share; always pass --no-prompt), DENO_DIR, HOME,
# TAPD_HOST_REPO (the repo's host path, a link to /mnt/repo), TAPD_LIB (this file), and
# whatever runXen's `env` option adds. Settings read here: GUEST_MEMORY (MiB, default 256),
# GUEST_VCPUS (default 1), GUEST_EXTRA_CFG (extra xl config lines for start_guest).

XEN_LOG_DIR=/var/log/xen
GUEST_KERNEL=/boot/vmlinux
GUEST_RAMDISK=/boot/domu.cpio
GUEST_CFG_DIR=/run/guests

# note TEXT...: a marker line on the serial console.
note() { echo "TAPD-DOM0 $*"; }

# report KEY VALUE...: a "TAPD-REPORT KEY=VALUE" line; runXen collects them in XenRun.reports.
report() {
  _k=$1
  shift
  echo "TAPD-REPORT $_k=$*"
}

guest_logfile() { echo "$XEN_LOG_DIR/guest-$1.log"; }

# start_guest NAME MODE [WORD...]: xl create a PV domU (the dom0 kernel plus the domU initramfs,
# GUEST_MEMORY MiB, 1 vCPU, no disks, no network) whose kernel command line carries tapd.mode=MODE
# and the extra WORDs (e.g. tapd.dev=xvdb tapd.seed=7 tapd.zero=0). A previous console log of
# NAME is moved aside. Returns xl's status.
start_guest() {
  _name=$1 _mode=$2
  shift 2
  mkdir -p "$GUEST_CFG_DIR"
  _log=$(guest_logfile "$_name")
  if [ -f "$_log" ]; then
    _n=1
    while [ -e "$_log.$_n" ]; do _n=$((_n + 1)); done
    mv "$_log" "$_log.$_n"
  fi
  # An explicit uuid: libxl's own (libuuid, time-based without uuidd) costs 3 s under TCG.
  cat >"$GUEST_CFG_DIR/$_name.cfg" <<EOF
name = "$_name"
uuid = "$(cat /proc/sys/kernel/random/uuid)"
type = "pv"
kernel = "$GUEST_KERNEL"
ramdisk = "$GUEST_RAMDISK"
extra = "console=hvc0 quiet tapd.mode=$_mode $*"
memory = ${GUEST_MEMORY:-256}
vcpus = ${GUEST_VCPUS:-1}
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "destroy"
${GUEST_EXTRA_CFG:-}
EOF
  xl create -q "$GUEST_CFG_DIR/$_name.cfg"
}

# guest_domid NAME: prints the guest's domid; status 1 when there is no such domain.
guest_domid() { xl domid "$1" 2>/dev/null; }

# guest_alive NAME: status 0 while the domain exists (running, paused or dying).
guest_alive() { xl domid "$1" >/dev/null 2>&1; }

# guest_log NAME: prints the guest's console log so far, each line prefixed "[guest NAME] ".
guest_log() {
  _f=$(guest_logfile "$1")
  [ -f "$_f" ] || {
    echo "[guest $1] (no console log)"
    return 0
  }
  tr -d '\r' <"$_f" | sed "s/^/[guest $1] /"
}

# guest_has NAME PATTERN: status 0 when the console log has a line matching PATTERN (grep -E).
guest_has() { tr -d '\r' <"$(guest_logfile "$1")" 2>/dev/null | grep -qE "$2"; }

# wait_guest_line NAME PATTERN [TIMEOUT=120]: waits for a console line matching PATTERN.
# 0 found, 1 timeout, 2 the domain went away without printing it.
wait_guest_line() {
  _ticks=$((${3:-120} * 5))
  _i=0
  while [ "$_i" -lt "$_ticks" ]; do
    guest_has "$1" "$2" && return 0
    if ! guest_alive "$1"; then
      sleep 0.5
      guest_has "$1" "$2" && return 0
      note "guest $1 is gone; its console never matched '$2'"
      return 2
    fi
    sleep 0.2
    _i=$((_i + 1))
  done
  note "timeout after ${3:-120}s waiting for guest $1 to print '$2'"
  return 1
}

# wait_guest_ready NAME [TIMEOUT=90]: waits for "TAPD-GUEST READY" (xen-blkfront is loaded by
# then, so a hot-plugged disk never hits blkfront's 30 s registration wait). On failure prints
# the guest's console. Same statuses as wait_guest_line.
wait_guest_ready() {
  wait_guest_line "$1" '^TAPD-GUEST READY' "${2:-90}" && return 0
  _rc=$?
  guest_log "$1"
  return "$_rc"
}

# wait_guest_result NAME [TIMEOUT=180] [N=1]: waits until the guest printed N RESULT lines
# (or a failing one); 0 when all so far are ok, 1 when one failed or on timeout.
wait_guest_result() {
  _ticks=$((${2:-180} * 5))
  _want=${3:-1}
  _i=0
  while [ "$_i" -lt "$_ticks" ]; do
    _f=$(guest_logfile "$1")
    if [ -f "$_f" ]; then
      guest_has "$1" '^TAPD-GUEST RESULT fail' && return 1
      [ "$(tr -d '\r' <"$_f" | grep -c '^TAPD-GUEST RESULT ok')" -ge "$_want" ] && return 0
    fi
    if ! guest_alive "$1"; then
      sleep 0.5
      [ "$(tr -d '\r' <"$_f" 2>/dev/null | grep -c '^TAPD-GUEST RESULT ok')" -ge "$_want" ] &&
        ! guest_has "$1" '^TAPD-GUEST RESULT fail' && return 0
      note "guest $1 is gone before printing $_want ok result(s)"
      return 1
    fi
    sleep 0.2
    _i=$((_i + 1))
  done
  note "timeout after ${2:-180}s waiting for a result from guest $1"
  return 1
}

# wait_guest_gone NAME [TIMEOUT=60]: waits until the domain no longer exists. 0 gone, 1 timeout.
wait_guest_gone() {
  _ticks=$((${2:-60} * 5))
  _i=0
  while [ "$_i" -lt "$_ticks" ]; do
    guest_alive "$1" || return 0
    sleep 0.2
    _i=$((_i + 1))
  done
  note "timeout after ${2:-60}s waiting for guest $1 to go away"
  return 1
}

# guest_passed NAME: 0 when the console has at least one "RESULT ok" and no "RESULT fail".
guest_passed() {
  guest_has "$1" '^TAPD-GUEST RESULT ok' && ! guest_has "$1" '^TAPD-GUEST RESULT fail'
}

# wait_guest_done NAME [TIMEOUT=300]: waits until the guest finished its mode (printed
# "TAPD-GUEST DONE" or went away) and is destroyed, prints its console (guest_log), and returns
# 0 when guest_passed, 1 when not, 2 on timeout.
wait_guest_done() {
  _rc=0
  wait_guest_line "$1" '^TAPD-GUEST DONE' "${2:-300}"
  [ $? = 1 ] && _rc=2
  [ "$_rc" = 0 ] && { wait_guest_gone "$1" 30 || _rc=2; }
  guest_log "$1"
  [ "$_rc" = 0 ] || return "$_rc"
  guest_passed "$1"
}

# destroy_guest NAME [TIMEOUT=30]: xl destroy, then wait until the domain is gone.
destroy_guest() {
  xl destroy "$1" || return 1
  wait_guest_gone "$1" "${2:-30}"
}

# xs_state PATH: prints the xenbus state at PATH/state (0 when missing).
xs_state() { xenstore-read "$1/state" 2>/dev/null || echo 0; }

# wait_xs_state PATH STATE [TIMEOUT=30]: waits until PATH/state reads STATE.
wait_xs_state() {
  _ticks=$((${3:-30} * 5))
  _i=0
  while [ "$_i" -lt "$_ticks" ]; do
    [ "$(xs_state "$1")" = "$2" ] && return 0
    sleep 0.2
    _i=$((_i + 1))
  done
  note "timeout: $1/state is $(xs_state "$1"), wanted $2"
  return 1
}

# vbd_devid NAME: the blkif devid of xvdX (xvda 51712, xvdb 51728, ... up to xvdp).
vbd_devid() {
  _l=${1#xvd}
  _i=$(printf '%d' "'$_l")
  echo $(((202 << 8) | ((_i - 97) << 4)))
}

# vbd_add DOMID DEV KIND [PARAMS] [MODE=w]: the toolstack half of a hot-plug, by hand (spec
# §3.6): creates /local/domain/0/backend/KIND/DOMID/DEVID and the guest's device/vbd/DEVID with
# state 1 on both sides and the usual permissions. A backend serving KIND takes it from there.
# Order matters, as xenstore-chmod cannot join a transaction:
#  1. backend/KIND/DOMID gets (n0,rDOMID), so the backend nodes made below inherit read access;
#  2. the frontend nodes except state, then the guest gets its directory (nDOMID,r0);
#  3. one transaction: every backend node plus the frontend's state=1 (which inherits nDOMID).
# So the frontend, which ignores the directory until state reads 1, finds a readable backend
# and may write its own nodes; and a backend that probes the new directory finds the frontend's
# state (Linux blkback drops a device whose frontend state reads as missing: Unknown).
vbd_add() {
  _d=$1 _dev=$2 _kind=$3 _params=${4:-} _m=${5:-w}
  _id=$(vbd_devid "$_dev")
  _be=/local/domain/0/backend/$_kind/$_d/$_id
  _fe=/local/domain/$_d/device/vbd/$_id
  if ! xenstore-exists "${_be%/*}"; then xenstore-write "${_be%/*}" "" || return 1; fi
  xenstore-chmod "${_be%/*}" n0 "r$_d" &&
    xenstore-write "$_fe/backend" "$_be" "$_fe/backend-id" 0 "$_fe/virtual-device" "$_id" \
      "$_fe/device-type" disk &&
    xenstore-chmod -r "$_fe" "n$_d" r0 &&
    xenstore-write "$_be/frontend" "$_fe" "$_be/frontend-id" "$_d" "$_be/online" 1 \
      "$_be/removable" 0 "$_be/bootable" 1 "$_be/state" 1 "$_be/dev" "$_dev" \
      "$_be/type" phy "$_be/mode" "$_m" "$_be/device-type" disk "$_be/params" "$_params" \
      "$_fe/state" 1
}

# vbd_remove DOMID DEV KIND [TIMEOUT=30]: the toolstack half of an unplug: backend online=0 and
# state=5, wait for the backend to reach 6, then remove both directories.
vbd_remove() {
  _d=$1 _kind=$3
  _id=$(vbd_devid "$2")
  _be=/local/domain/0/backend/$_kind/$_d/$_id
  _fe=/local/domain/$_d/device/vbd/$_id
  xenstore-write "$_be/online" 0 "$_be/state" 5
  wait_xs_state "$_be" 6 "${4:-30}"
  _rc=$?
  xenstore-rm "$_be" 2>/dev/null
  xenstore-rm "$_fe" 2>/dev/null
  return "$_rc"
}

# blkback_add DOMID DEV BLOCKDEV: attaches dom0 block device BLOCKDEV to the guest through the
# dom0 kernel's own xen-blkback (kind vbd), as a reference backend to compare against. Loads
# xen-blkback on first use (it then owns every "vbd" backend dir; tapd uses its own kind).
blkback_add() {
  grep -q '^xen_blkback ' /proc/modules || insmod /lib/modules/xen_blkback.ko || return 1
  _mm=$(stat -L -c '%t:%T' "$3") || return 1
  vbd_add "$1" "$2" vbd "$3" &&
    xenstore-write "/local/domain/0/backend/vbd/$1/$(vbd_devid "$2")/physical-device" "$_mm"
}
