# Sourced by ./tapd and ./run-tests: makes sure the pinned Deno and the Debian packages tapd needs
# are present, installing what is missing (Deno from the npm registry, packages with apt-get).
# Sets TAPD_DENO to the deno binary.

tapd_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The Deno binary that `npm ci` installs from the pinned `deno` package (toolchain/package.json and
# its lock file; kept out of the root so that Deno does not treat it as the project's npm
# dependencies). A link node_modules/.bin/deno points at it for editors and hooks.
ensure_deno() {
  TAPD_DENO="$tapd_root/toolchain/node_modules/@deno/linux-x64-glibc/deno"
  if [ -x "$TAPD_DENO" ]; then
    [ -e "$tapd_root/node_modules/.bin/deno" ] || link_deno || true # a convenience only
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "tapd: Deno is not installed and npm is missing: install Node.js/npm (apt-get install npm), then retry" >&2
    return 1
  fi
  echo "tapd: installing Deno (npm ci) ..." >&2
  (cd "$tapd_root/toolchain" && npm ci --no-audit --no-fund --loglevel=error >&2) || {
    echo "tapd: npm ci failed: cannot install Deno" >&2
    return 1
  }
  [ -x "$TAPD_DENO" ] || { echo "tapd: npm ci did not install $TAPD_DENO" >&2; return 1; }
  link_deno
}

# Relative, so that it still points at the binary where the tree is mounted elsewhere (the Xen
# harness's dom0 sees it read-only at /mnt/repo).
link_deno() {
  mkdir -p "$tapd_root/node_modules/.bin" 2>/dev/null &&
    ln -sfn ../../toolchain/node_modules/@deno/linux-x64-glibc/deno \
      "$tapd_root/node_modules/.bin/deno" 2>/dev/null
}

# ensure_packages CHECK:PACKAGE ... — CHECK is a shared library soname (lib*.so*), a file path or a
# command;
# missing ones are installed with apt-get when running as root, otherwise the apt-get line is shown.
ensure_packages() {
  local missing=() item check pkg
  for item in "$@"; do
    check=${item%%:*} pkg=${item#*:}
    case $check in
      lib*.so*) ldconfig -p 2>/dev/null | grep "[[:space:]]$check " >/dev/null && continue ;;
      /*) [ -e "$check" ] && continue ;;
      *) command -v "$check" >/dev/null 2>&1 && continue ;;
    esac
    missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "tapd: missing packages; install them with: apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  echo "tapd: installing ${missing[*]} ..." >&2
  if ! apt_install "${missing[@]}"; then
    apt-get update -qq >/dev/null 2>&1
    # Debian 13 renamed libaio1 to libaio1t64.
    apt_install "${missing[@]}" || apt_install "${missing[@]/#libaio1/libaio1t64}" || {
      echo "tapd: apt-get install ${missing[*]} failed" >&2
      return 1
    }
  fi
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null 2>&1
}

# Permissions tapd runs with (also baked into the compiled binary). FFI access is all access in
# effect, and Deno guards some files (/proc/self/task, for pinning threads) behind --allow-all.
TAPD_PERMISSIONS=(--allow-all)

# Libraries the program loads at run time.
TAPD_RUNTIME_PACKAGES=(libaio.so.1:libaio1 liburing.so.2:liburing2)
# Peers and tools the tests drive.
TAPD_TEST_PACKAGES=(qemu-img:qemu-utils nbdinfo:libnbd-bin fio:fio gcc:gcc losetup:mount
  /usr/include/xen/io/ring.h:libxen-dev nbdkit:nbdkit mkfs.ext4:e2fsprogs)
# What bench/seed_table.ts drives (it installs these itself, whether or not the tests ran first).
TAPD_BENCH_PACKAGES=(bonnie++:bonnie++ qemu-storage-daemon:qemu-system-common qemu-nbd:qemu-utils
  nbdfuse:libnbd-bin fio:fio mkfs.ext4:e2fsprogs losetup:mount)
