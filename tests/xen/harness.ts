/**
 * A Xen test harness for this no-KVM machine: QEMU (TCG, `-cpu Nehalem`) boots Xen 4.17 with a
 * Linux 6.1 PV dom0 from an initramfs; the dom0 runs a test's shell script, which starts PV domUs
 * (the same kernel with a small guest initramfs) and drives them. The repo is shared into dom0
 * read-only over 9p at /mnt/repo (with Deno), a work directory read-write at /mnt/work.
 *
 * Everything comes from Debian packages: host tools are installed with apt-get when missing; Xen,
 * its tools and the kernel are fetched with `apt-get download` and unpacked with `dpkg -x`. The
 * result is cached under /var/cache/tapd-xen/, keyed by the package versions, the harness's own
 * sources and the host files copied in, so a second `prepareXen` costs ~0.1 s (a few `ldd`
 * calls). The initramfs images are newc cpio archives written here (device nodes and root
 * ownership need neither mknod nor the cpio tool). See docs/xen-harness.md; the guest side lives
 * in tests/xen/harness/.
 */
import { createHash } from "node:crypto";

/** Where downloads, unpacked packages and built images are kept (override: TAPD_XEN_CACHE). */
export const XEN_CACHE_DIR: string = Deno.env.get("TAPD_XEN_CACHE") ?? "/var/cache/tapd-xen";

const HERE = new URL("./harness/", import.meta.url).pathname;
/** The repository this file belongs to (shared read-only into dom0 at /mnt/repo). */
export const REPO_ROOT: string = new URL("../../", import.meta.url).pathname.replace(/\/$/, "");

/** Bumped whenever the image layout built here changes (part of the cache key). */
const RECIPE = 2;
const XEN_SERIES = "4.17";
const ARCH_LIBS = ["/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu"];

/** The Debian packages unpacked into the images (the kernel's name is resolved at run time). */
const XEN_PACKAGES = [
  `xen-hypervisor-${XEN_SERIES}-amd64`,
  `xen-utils-${XEN_SERIES}`,
  "xen-utils-common",
  "xenstore-utils",
  "libxenstore4",
  `libxenmisc${XEN_SERIES}`,
  "libxencall1",
  "libxendevicemodel1",
  "libxenevtchn1",
  "libxenforeignmemory1",
  "libxengnttab1",
  "libxenhypfs1",
  "libxentoolcore1",
  "libxentoollog1",
  "libyajl2",
];

/** Host packages the harness uses: [how to tell it is there, package]. */
const HOST_PACKAGES: [string, string][] = [
  ["qemu-system-x86_64", "qemu-system-x86"],
  ["dpkg:busybox-static", "busybox-static"],
  ["gcc", "gcc"],
  ["/usr/lib/x86_64-linux-gnu/libc.a", "libc6-dev"],
  ["mke2fs", "e2fsprogs"],
  ["xz", "xz-utils"],
  ["libaio.so.1", "libaio1"],
  ["liburing.so.2", "liburing2"],
];

/** Kernel modules loaded by the dom0 init, in this order (dependencies are added before). */
const DOM0_MODULES = [
  "xen-privcmd",
  "xenfs",
  "xen-evtchn",
  "xen-gntdev",
  "xen-gntalloc",
  "virtio_pci",
  "virtio_blk",
  "9pnet_virtio",
  "9p",
  "loop",
  "crc32c_generic",
  "ext4",
];
/** Copied into dom0 but not loaded (lib.sh blkback_add loads it). */
const DOM0_EXTRA_MODULES = ["xen-blkback"];
/** Kernel modules loaded by the guest init, with their parameters. */
const DOMU_MODULES: [string, string][] = [
  ["xen-blkfront", "max_ring_page_order=2"],
  ["crc32c_generic", ""],
  ["ext4", ""],
];
/** Libraries Deno (and tapd's FFI) load in dom0 beyond what `ldd` of the tools lists. */
const EXTRA_LIBS = [
  "libgcc_s.so.1",
  "libdl.so.2",
  "librt.so.1",
  "libpthread.so.0",
  "libm.so.6",
  "libc.so.6",
  "libaio.so.1",
  "liburing.so.2",
];
/** The Xen tool binaries whose libraries are collected with ldd. */
const XEN_TOOLS = [
  `usr/lib/xen-${XEN_SERIES}/bin/xl`,
  `usr/lib/xen-${XEN_SERIES}/bin/xenstored`,
  `usr/lib/xen-${XEN_SERIES}/bin/xenconsoled`,
  `usr/lib/xen-${XEN_SERIES}/bin/xen-init-dom0`,
  `usr/lib/xen-${XEN_SERIES}/bin/libxl-save-helper`,
  `usr/lib/xen-${XEN_SERIES}/bin/xenstore-control`,
  "usr/bin/xenstore",
];
/** Parts of the unpacked Xen packages left out of dom0. */
const XEN_TREE_SKIP = [
  "boot/",
  "usr/share/",
  "etc/init.d/",
  "etc/default/",
  "usr/sbin/",
  "usr/lib/xen-common/",
  `usr/lib/xen-${XEN_SERIES}/boot/`,
  `usr/lib/xen-${XEN_SERIES}/lib/python/`,
  "usr/bin/pygrub",
  `usr/lib/xen-${XEN_SERIES}/bin/pygrub`,
];

/** What `prepareXen` built: everything `runXen` boots. */
export interface XenHarness {
  /** The build directory (under XEN_CACHE_DIR) holding the files below. */
  dir: string;
  /** Xen, gunzipped (a multiboot ELF). */
  xen: string;
  /** The Linux kernel (dom0 and domU) as an ELF vmlinux, taken out of the package's bzImage. */
  kernel: string;
  /** `uname -r` of that kernel, e.g. 6.1.0-56-amd64. */
  kernelRelease: string;
  /** The dom0 initramfs (newc cpio; holds the domU kernel and initramfs under /boot). */
  dom0Initrd: string;
  /** The domU initramfs (also at /boot/domu.cpio inside dom0). */
  domuInitrd: string;
  /** Package name → version of every unpacked Debian package. */
  packages: Record<string, string>;
  /** The qemu-system-x86_64 binary. */
  qemu: string;
  /** The host binary of the guest test program (same as `xvdtestPath()`). */
  xvdtest: string;
}

/** A guest the dom0 starts (with lib.sh `start_guest`) before it runs the dom0 script. */
export interface XenGuest {
  name: string;
  /** The guest init's tapd.mode (idle, pattern, verify, mkfs, busy, reattach, ...). */
  mode: string;
  /** More words for the guest kernel command line, e.g. ["tapd.dev=xvdb", "tapd.seed=7"]. */
  args?: string[];
}

export interface XenRunOptions {
  /** Shell script (busybox sh) run in dom0 with tests/xen/harness/lib.sh sourced. */
  dom0Script: string;
  /** A host directory, shared read-write at /mnt/work (the script is copied there). */
  work: string;
  /** QEMU is killed after this long (the run then has ok=false). */
  timeoutMs: number;
  /** Guests started before the script runs (their consoles: lib.sh wait_guest_ready etc.). */
  guests?: XenGuest[];
  /** Host raw images attached as virtio-blk disks: /dev/vda, /dev/vdb, ... in dom0. */
  disks?: string[];
  /** Extra environment for the dom0 script. */
  env?: Record<string, string>;
  /** Copy the serial console to stderr as it arrives (default: TAPD_XEN_ECHO=1). */
  echo?: boolean;
  /**
   * Physical CPUs of the emulated machine (QEMU -smp; Xen gives dom0 as many vCPUs). Default 2
   * (or TAPD_XEN_CPUS): with multi-threaded TCG a guest boots in ~6 s instead of ~9 s.
   */
  cpus?: number;
  /** Keep dom0's DENO_DIR between runs (default true): saves ~3 s per Deno start. */
  denoCache?: boolean;
}

/** One `TAPD-GUEST RESULT` line, as printed by lib.sh guest_log ("[guest NAME] ..."). */
export interface GuestResult {
  guest: string;
  ok: boolean;
  detail: string;
}

/** A harness line with the time it reached the host (ms after QEMU started). */
export interface XenMark {
  ms: number;
  line: string;
}

export interface XenRun {
  /** The serial console (Xen, dom0 kernel, init and script output), CR-free. */
  console: string;
  /** The dom0 script exited 0, the dom0 powered off, and QEMU exited before the timeout. */
  ok: boolean;
  /** The dom0 script's exit status (from "TAPD-DOM0 DONE status=N"), null if never printed. */
  status: number | null;
  timedOut: boolean;
  /** From QEMU's start to its exit (or kill). */
  durationMs: number;
  /** From QEMU's start to "TAPD-DOM0 READY" (xenstored and xenconsoled running). */
  bootMs: number | null;
  /** From "TAPD-DOM0 READY" to "TAPD-DOM0 DONE". */
  scriptMs: number | null;
  /** KEY=VALUE of the script's `report KEY VALUE` lines (last one wins). */
  reports: Record<string, string>;
  /** Every guest RESULT line that reached the console (through guest_log). */
  guestResults: GuestResult[];
  /** Lines starting with TAPD- and when they arrived. */
  marks: XenMark[];
  qemuStderr: string;
  qemuExitCode: number | null;
}

class Skip extends Error {}

interface Output {
  code: number;
  stdout: string;
  stderr: string;
}

async function exec(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: Record<string, string> } = {},
): Promise<Output> {
  try {
    const out = await new Deno.Command(cmd, {
      args,
      cwd: opts.cwd,
      env: opts.env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).output();
    const dec = new TextDecoder();
    return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      return { code: 127, stdout: "", stderr: `${cmd}: not found` };
    }
    throw e;
  }
}

async function mustExec(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: Record<string, string> } = {},
): Promise<string> {
  const out = await exec(cmd, args, opts);
  if (out.code !== 0) {
    throw new Error(`${cmd} ${args.join(" ")} failed (${out.code}): ${out.stderr}${out.stdout}`);
  }
  return out.stdout;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

function which(cmd: string): string | null {
  const dirs = (Deno.env.get("PATH") ?? "").split(":").concat(["/usr/sbin", "/sbin"]);
  for (const d of dirs) {
    if (d && exists(`${d}/${cmd}`)) return `${d}/${cmd}`;
  }
  return null;
}

function findLib(soname: string): string | null {
  for (const d of ARCH_LIBS) if (exists(`${d}/${soname}`)) return `${d}/${soname}`;
  return null;
}

function sha(...parts: (string | Uint8Array)[]): string {
  const h = createHash("sha256");
  for (const p of parts) h.update(p);
  return h.digest("hex").slice(0, 16);
}

const isRoot = (): boolean => Deno.uid() === 0;

// ---------------------------------------------------------------------------------------------
// Host packages

async function hasHostPackage(check: string): Promise<boolean> {
  if (check.startsWith("dpkg:")) {
    const out = await exec("dpkg-query", ["-W", "-f=${Status}", check.slice(5)]);
    return out.code === 0 && out.stdout.includes("ok installed");
  }
  if (check.startsWith("/")) return exists(check);
  if (check.includes(".so")) return findLib(check) !== null;
  return which(check) !== null;
}

let aptUpdated = false;

async function aptUpdate(): Promise<void> {
  if (aptUpdated) return;
  aptUpdated = true;
  await exec("apt-get", ["update", "-qq"]);
}

async function ensureHostPackages(): Promise<void> {
  const missing: string[] = [];
  for (const [check, pkg] of HOST_PACKAGES) if (!(await hasHostPackage(check))) missing.push(pkg);
  if (missing.length === 0) return;
  if (!isRoot()) throw new Skip(`missing host packages (not root): ${missing.join(" ")}`);
  const install = () =>
    exec("apt-get", ["install", "-y", "-qq", "--no-install-recommends", ...missing], {
      env: { DEBIAN_FRONTEND: "noninteractive" },
    });
  let out = await install();
  if (out.code !== 0) {
    await aptUpdate();
    out = await install();
  }
  if (out.code !== 0) {
    throw new Skip(`apt-get install ${missing.join(" ")} failed: ${out.stderr.trim()}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Debian packages: resolve, download, unpack

/** Candidate versions of the packages, remembered per state of apt's package lists. */
async function resolvePackages(): Promise<Record<string, string>> {
  const lists = "/var/lib/apt/lists";
  let stamp = "";
  try {
    for (const e of Deno.readDirSync(lists)) {
      if (!e.isFile) continue;
      const st = Deno.statSync(`${lists}/${e.name}`);
      stamp += `${e.name}:${st.size}:${st.mtime?.getTime()}\n`;
    }
  } catch { /* no lists: ask apt-cache */ }
  const memo = `${XEN_CACHE_DIR}/versions.json`;
  const key = sha(stamp, XEN_PACKAGES.join(" "));
  try {
    const saved = JSON.parse(Deno.readTextFileSync(memo)) as {
      key: string;
      versions: Record<string, string>;
    };
    if (stamp && saved.key === key) return saved.versions;
  } catch { /* none yet */ }
  const versions = await askApt();
  try {
    Deno.writeTextFileSync(memo, JSON.stringify({ key, versions }, null, 1));
  } catch { /* read-only cache */ }
  return versions;
}

async function askApt(): Promise<Record<string, string>> {
  for (let attempt = 0;; attempt++) {
    const dep = await exec("apt-cache", ["depends", "linux-image-amd64"]);
    const kernel = dep.stdout.match(/Depends:\s*(linux-image-[0-9][\w.+-]*)/)?.[1];
    const names = kernel ? [...XEN_PACKAGES, kernel] : [];
    const versions: Record<string, string> = {};
    if (kernel) {
      const policy = await exec("apt-cache", ["policy", ...names]);
      let name = "";
      for (const line of policy.stdout.split("\n")) {
        const head = line.match(/^(\S+):$/);
        if (head) name = head[1].replace(/:amd64$/, "");
        const cand = line.match(/^\s+Candidate:\s*(\S+)/);
        if (cand && name && cand[1] !== "(none)") versions[name] = cand[1];
      }
    }
    const missing = kernel ? names.filter((n) => !versions[n]) : ["linux-image-amd64"];
    if (missing.length === 0) return versions;
    if (attempt > 0 || !isRoot()) {
      throw new Skip(`apt-cache knows no candidate for: ${missing.join(" ")}`);
    }
    await aptUpdate();
  }
}

/** The .deb of `name` at `version` in `dir`, if downloaded. */
function debFile(dir: string, name: string, version: string): string | null {
  const prefix = `${name}_${version.replaceAll(":", "%3a")}_`;
  for (const e of Deno.readDirSync(dir)) {
    if (e.isFile && e.name.startsWith(prefix) && e.name.endsWith(".deb")) return `${dir}/${e.name}`;
  }
  return null;
}

async function downloadDebs(versions: Record<string, string>): Promise<Record<string, string>> {
  const dir = `${XEN_CACHE_DIR}/debs`;
  Deno.mkdirSync(dir, { recursive: true });
  const want = () => Object.entries(versions).filter(([n, v]) => !debFile(dir, n, v));
  let missing = want();
  for (let attempt = 0; missing.length > 0 && attempt < 2; attempt++) {
    if (attempt > 0) await aptUpdate();
    const out = await exec(
      "apt-get",
      ["download", "-q", "-o", "APT::Sandbox::User=root", ...missing.map(([n, v]) => `${n}=${v}`)],
      { cwd: dir },
    );
    missing = want();
    if (missing.length > 0 && attempt === 1) {
      throw new Skip(
        `apt-get download failed: ${out.stderr.trim().split("\n").slice(-3).join(" ")}`,
      );
    }
  }
  const files: Record<string, string> = {};
  for (const [n, v] of Object.entries(versions)) files[n] = debFile(dir, n, v)!;
  return files;
}

interface Unpacked {
  /** dpkg -x of the Xen packages. */
  xenRoot: string;
  /** dpkg -x of the kernel package. */
  kernelRoot: string;
  kernelRelease: string;
  /** gunzipped Xen. */
  xen: string;
}

async function gunzip(src: string, dst: string): Promise<void> {
  const input = await Deno.open(src);
  const output = await Deno.open(dst, { write: true, create: true, truncate: true });
  await input.readable.pipeThrough(new DecompressionStream("gzip")).pipeTo(output.writable);
}

async function unpack(
  key: string,
  debs: Record<string, string>,
  kernelPkg: string,
): Promise<Unpacked> {
  const dir = `${XEN_CACHE_DIR}/unpacked-${key}`;
  if (!exists(`${dir}/ok`)) {
    const tmp = `${dir}.tmp-${Deno.pid}`;
    await rmrf(tmp);
    await rmrf(dir);
    Deno.mkdirSync(`${tmp}/xen`, { recursive: true });
    Deno.mkdirSync(`${tmp}/kernel`, { recursive: true });
    for (const [name, file] of Object.entries(debs)) {
      await mustExec("dpkg", ["-x", file, `${tmp}/${name === kernelPkg ? "kernel" : "xen"}`]);
    }
    const gz = `${tmp}/xen/boot/xen-${XEN_SERIES}-amd64.gz`;
    if (!exists(gz)) throw new Error(`${gz} is not in xen-hypervisor-${XEN_SERIES}-amd64`);
    await gunzip(gz, `${tmp}/xen.elf`);
    Deno.writeTextFileSync(`${tmp}/ok`, JSON.stringify(debs, null, 1));
    Deno.renameSync(tmp, dir);
  }
  const releases = [...Deno.readDirSync(`${dir}/kernel/lib/modules`)].map((e) => e.name);
  if (releases.length !== 1) throw new Error(`expected one kernel in ${dir}: ${releases}`);
  return {
    xenRoot: `${dir}/xen`,
    kernelRoot: `${dir}/kernel`,
    kernelRelease: releases[0],
    xen: `${dir}/xen.elf`,
  };
}

/**
 * The ELF vmlinux inside a bzImage (its payload, xz-decompressed): Xen and libxl's domain
 * builder load an ELF kernel directly, where a bzImage makes them unxz ~60 MB at TCG speed.
 */
async function extractVmlinux(bzImage: string, out: string): Promise<void> {
  const d = Deno.readFileSync(bzImage);
  const v = new DataView(d.buffer, d.byteOffset, d.byteLength);
  const setupSects = d[0x1f1] || 4;
  const payloadOffset = v.getUint32(0x248, true);
  const payloadLength = v.getUint32(0x24c, true);
  const start = (setupSects + 1) * 512 + payloadOffset;
  const payload = d.subarray(start, start + payloadLength);
  const xzMagic = [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00];
  if (!xzMagic.every((b, i) => payload[i] === b)) {
    throw new Error(`${bzImage}: the payload is not xz (CONFIG_KERNEL_XZ expected)`);
  }
  const child = new Deno.Command("xz", {
    args: ["-dc"],
    stdin: "piped",
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const file = await Deno.open(out, { write: true, create: true, truncate: true });
  const writing = child.stdout.pipeTo(file.writable);
  const w = child.stdin.getWriter();
  await w.write(payload);
  await w.close();
  await writing;
  await child.status; // xz reports "unexpected end of input": the payload lacks the stream end
  // So check instead that the output is an ELF file holding all its PT_LOAD segments.
  const elf = Deno.readFileSync(out);
  const ev = new DataView(elf.buffer, elf.byteOffset, elf.byteLength);
  if (elf.length < 64 || ev.getUint32(0, false) !== 0x7f454c46) {
    throw new Error(`${out} (the ${bzImage} payload) is not an ELF file`);
  }
  const phoff = Number(ev.getBigUint64(0x20, true));
  const phentsize = ev.getUint16(0x36, true);
  for (let i = 0; i < ev.getUint16(0x38, true); i++) {
    const ph = phoff + i * phentsize;
    if (ev.getUint32(ph, true) !== 1) continue; // PT_LOAD
    const end = Number(ev.getBigUint64(ph + 8, true) + ev.getBigUint64(ph + 32, true));
    if (end > elf.length) throw new Error(`${out} is truncated (segment ends at ${end})`);
  }
}

async function rmrf(path: string): Promise<void> {
  try {
    await Deno.remove(path, { recursive: true });
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Kernel modules

interface Module {
  name: string;
  path: string;
}

const modName = (s: string): string =>
  s.replace(/\.ko(\.xz|\.zst|\.gz)?$/, "").replaceAll("-", "_");

/** `wanted` plus their dependencies (from each .ko's .modinfo), dependencies first. */
function resolveModules(kernelRoot: string, release: string, wanted: string[]): Module[] {
  const base = `${kernelRoot}/lib/modules/${release}`;
  const index = new Map<string, string>();
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(dir)) {
      if (e.isDirectory) walk(`${dir}/${e.name}`);
      else if (e.name.endsWith(".ko")) index.set(modName(e.name), `${dir}/${e.name}`);
    }
  };
  walk(`${base}/kernel`);
  const builtin = new Set(
    Deno.readTextFileSync(`${base}/modules.builtin`).split("\n").filter(Boolean).map((l) =>
      modName(l.split("/").pop()!)
    ),
  );
  const order: Module[] = [];
  const seen = new Set<string>();
  const visit = (raw: string, chain: string[]) => {
    const name = modName(raw);
    if (seen.has(name) || builtin.has(name)) return;
    const path = index.get(name);
    if (!path) throw new Error(`kernel module ${raw} not found (needed by ${chain.join(" <- ")})`);
    seen.add(name);
    const info = new TextDecoder("latin1").decode(Deno.readFileSync(path));
    for (const m of info.matchAll(/\0depends=([^\0]*)\0/g)) {
      for (const d of m[1].split(",").filter(Boolean)) visit(d, [name, ...chain]);
    }
    order.push({ name, path });
  };
  for (const w of wanted) visit(w, ["(harness)"]);
  return order;
}

// ---------------------------------------------------------------------------------------------
// Host files: ldd

/** The host libraries (absolute paths as ldd prints them) `files` need, libraries found in a
 * `skipUnder` directory left out. */
async function lddLibs(files: string[], libPath: string, skipUnder: string): Promise<string[]> {
  const out = await exec("ldd", files, { env: { LD_LIBRARY_PATH: libPath } });
  const libs = new Set<string>();
  for (const line of out.stdout.split("\n")) {
    if (/not found/.test(line)) throw new Error(`ldd: ${line.trim()} (for ${files.join(" ")})`);
    const m = line.match(/=>\s*(\/\S+)/) ?? line.match(/^\s*(\/\S+)\s+\(0x/);
    if (m && !m[1].startsWith(skipUnder)) libs.add(m[1]);
  }
  return [...libs].sort();
}

interface HostFiles {
  busybox: string;
  bash: string;
  ldconfig: string;
  mke2fs: string;
  e2fsck: string;
  mke2fsConf: string | null;
  /** Libraries dom0 needs (Xen tools, bash, e2fsprogs, Deno, tapd). */
  dom0Libs: string[];
  /** Libraries the domU needs (e2fsprogs). */
  domuLibs: string[];
}

async function hostFiles(un: Unpacked): Promise<HostFiles> {
  const need = (cmd: string) => {
    const p = which(cmd);
    if (!p) throw new Error(`${cmd} is missing on the host`);
    return Deno.realPathSync(p);
  };
  const busybox = Deno.realPathSync("/bin/busybox");
  const bash = need("bash");
  const ldconfig = need("ldconfig");
  const mke2fs = need("mke2fs");
  const e2fsck = need("e2fsck");
  const xenLib = [
    `${un.xenRoot}/usr/lib/x86_64-linux-gnu`,
    `${un.xenRoot}/usr/lib/xen-${XEN_SERIES}/lib/x86_64-linux-gnu`,
  ]
    .join(":");
  const extra = EXTRA_LIBS.map((l) => {
    const p = findLib(l);
    if (!p) throw new Skip(`host library ${l} is missing`);
    return p;
  });
  const deno = `${REPO_ROOT}/toolchain/node_modules/@deno/linux-x64-glibc/deno`;
  const domuLibs = await lddLibs([mke2fs, e2fsck], "", "\0");
  const dom0Libs = await lddLibs(
    [
      ...XEN_TOOLS.map((t) => `${un.xenRoot}/${t}`),
      bash,
      mke2fs,
      e2fsck,
      ...extra,
      ...(exists(deno) ? [deno] : []),
    ],
    xenLib,
    un.xenRoot,
  );
  for (const l of extra) if (!dom0Libs.includes(l)) dom0Libs.push(l);
  return {
    busybox,
    bash,
    ldconfig,
    mke2fs,
    e2fsck,
    mke2fsConf: exists("/etc/mke2fs.conf") ? "/etc/mke2fs.conf" : null,
    dom0Libs: dom0Libs.sort(),
    domuLibs,
  };
}

function fingerprint(paths: string[]): string {
  return paths.map((p) => {
    const st = Deno.statSync(p);
    return `${p}:${st.size}:${st.mtime?.getTime()}`;
  }).join("\n");
}

// ---------------------------------------------------------------------------------------------
// newc cpio (written here, so device nodes and root ownership need no mknod or fakeroot)

type Entry =
  | { kind: "dir" }
  | { kind: "file"; src: string; mode: number }
  | { kind: "data"; data: Uint8Array; mode: number }
  | { kind: "link"; target: string }
  | { kind: "char"; major: number; minor: number };

class Archive {
  entries = new Map<string, Entry>();

  add(path: string, entry: Entry): void {
    path = path.replace(/^\/+/, "");
    const parts = path.split("/");
    for (let i = 1; i < parts.length; i++) {
      const dir = parts.slice(0, i).join("/");
      const cur = this.entries.get(dir);
      if (!cur) this.entries.set(dir, { kind: "dir" });
      else if (cur.kind !== "dir") throw new Error(`${dir} is not a directory in the archive`);
    }
    this.entries.set(path, entry);
  }

  /** A host file, dereferenced, with its permission bits. */
  file(path: string, src: string, mode?: number): void {
    const st = Deno.statSync(src);
    this.add(path, { kind: "file", src, mode: mode ?? ((st.mode ?? 0o644) & 0o7777) });
  }

  text(path: string, text: string, mode = 0o644): void {
    this.add(path, { kind: "data", data: new TextEncoder().encode(text), mode });
  }

  link(path: string, target: string): void {
    this.add(path, { kind: "link", target });
  }

  /** A host tree: files, links and directories, `skip` prefixes (relative) left out. */
  tree(at: string, root: string, skip: string[] = []): void {
    const walk = (rel: string) => {
      for (const e of Deno.readDirSync(rel ? `${root}/${rel}` : root)) {
        const r = rel ? `${rel}/${e.name}` : e.name;
        if (skip.some((s) => r === s.replace(/\/$/, "") || r.startsWith(s))) continue;
        const full = `${root}/${r}`;
        if (e.isSymlink) this.link(`${at}/${r}`, Deno.readLinkSync(full));
        else if (e.isDirectory) {
          this.add(`${at}/${r}`, { kind: "dir" });
          walk(r);
        } else this.file(`${at}/${r}`, full);
      }
    };
    walk("");
  }

  async write(out: string): Promise<void> {
    const f = await Deno.open(out, { write: true, create: true, truncate: true });
    const enc = new TextEncoder();
    let ino = 1;
    const pad = (n: number) => new Uint8Array((4 - (n % 4)) % 4);
    const put = async (
      name: string,
      mode: number,
      data: Uint8Array | null,
      size: number,
      rdev: [number, number] = [0, 0],
      src: string | null = null,
    ) => {
      const nameBytes = enc.encode(name + "\0");
      const hex = (v: number) => v.toString(16).padStart(8, "0");
      const fields = [ino++, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], nameBytes.length, 0];
      const header = enc.encode("070701" + fields.map(hex).join(""));
      await writeAll(f, header);
      await writeAll(f, nameBytes);
      await writeAll(f, pad(header.length + nameBytes.length));
      if (data) await writeAll(f, data);
      else if (src) {
        const s = await Deno.open(src);
        let n = 0;
        const buf = new Uint8Array(1 << 20);
        for (;;) {
          const r = await s.read(buf);
          if (r === null) break;
          await writeAll(f, buf.subarray(0, r));
          n += r;
        }
        s.close();
        if (n !== size) throw new Error(`${src} changed size while archiving`);
      }
      await writeAll(f, pad(size));
    };
    try {
      for (const path of [...this.entries.keys()].sort()) {
        const e = this.entries.get(path)!;
        switch (e.kind) {
          case "dir":
            await put(path, 0o040755, null, 0);
            break;
          case "file":
            await put(path, 0o100000 | e.mode, null, Deno.statSync(e.src).size, [0, 0], e.src);
            break;
          case "data":
            await put(path, 0o100000 | e.mode, e.data, e.data.length);
            break;
          case "link": {
            const t = enc.encode(e.target);
            await put(path, 0o120777, t, t.length);
            break;
          }
          case "char":
            await put(path, 0o020600, null, 0, [e.major, e.minor]);
            break;
        }
      }
      await put("TRAILER!!!", 0, null, 0);
    } finally {
      f.close();
    }
  }
}

async function writeAll(f: Deno.FsFile, data: Uint8Array): Promise<void> {
  let off = 0;
  while (off < data.length) off += await f.write(data.subarray(off));
}

/** The parts both initramfs images share: busybox, device nodes, modules, e2fsprogs, xvdtest. */
function baseImage(
  a: Archive,
  host: HostFiles,
  libs: string[],
  modules: Module[],
  params: Map<string, string>,
  xvdtest: string,
): void {
  for (
    const d of ["proc", "sys", "dev", "tmp", "run", "mnt", "root", "usr/bin", "usr/sbin", "sbin"]
  ) {
    a.add(d, { kind: "dir" });
  }
  a.file("bin/busybox", host.busybox, 0o755);
  a.link("bin/sh", "busybox");
  a.add("dev/console", { kind: "char", major: 5, minor: 1 });
  a.add("dev/null", { kind: "char", major: 1, minor: 3 });
  for (const l of libs) a.file(l, l);
  a.file("sbin/mke2fs", host.mke2fs, 0o755);
  a.file("sbin/e2fsck", host.e2fsck, 0o755);
  for (const l of ["mkfs.ext4", "mkfs.ext2", "mkfs.ext3"]) a.link(`sbin/${l}`, "mke2fs");
  a.link("sbin/fsck.ext4", "e2fsck");
  if (host.mke2fsConf) a.file("etc/mke2fs.conf", host.mke2fsConf);
  a.text("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n");
  a.text("etc/group", "root:x:0:\n");
  a.file("usr/bin/xvdtest", xvdtest, 0o755);
  for (const m of modules) a.file(`lib/modules/${m.name}.ko`, m.path, 0o644);
  a.text(
    "lib/modules/load.list",
    modules.filter((m) => params.has(m.name)).map((m) => `${m.name} ${params.get(m.name)}\n`)
      .join(""),
  );
}

// ---------------------------------------------------------------------------------------------
// xvdtest

let xvdtestBuilt: Promise<string> | undefined;

/**
 * The host path of the guest test program (tests/xen/harness/xvdtest.c, gcc -static -O2),
 * compiled once per source hash into XEN_CACHE_DIR (or /var/tmp when that is not writable).
 * `xvdtest verify IMAGE` on the host checks what a guest's `xvdtest write` (mode pattern) left.
 */
export function xvdtestPath(): Promise<string> {
  xvdtestBuilt ??= buildXvdtest();
  return xvdtestBuilt;
}

async function buildXvdtest(): Promise<string> {
  const src = `${HERE}xvdtest.c`;
  const key = sha(Deno.readFileSync(src));
  if (exists(`${XEN_CACHE_DIR}/xvdtest-${key}`)) return `${XEN_CACHE_DIR}/xvdtest-${key}`;
  let dir = XEN_CACHE_DIR;
  try {
    Deno.mkdirSync(dir, { recursive: true });
    Deno.writeTextFileSync(`${dir}/.writable`, "");
  } catch {
    dir = "/var/tmp";
  }
  const bin = `${dir}/xvdtest-${key}`;
  if (exists(bin)) return bin;
  const tmp = `${bin}.tmp-${Deno.pid}`;
  const out = await exec("gcc", ["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", tmp, src]);
  if (out.code !== 0) throw new Error(`gcc -static ${src} failed:\n${out.stderr}`);
  Deno.renameSync(tmp, bin);
  return bin;
}

// ---------------------------------------------------------------------------------------------
// prepareXen

let prepared: Promise<XenHarness | string> | undefined;

/**
 * Makes sure everything `runXen` needs exists (installing, downloading and building what is
 * missing; see the module comment) and describes it. Returns a reason to skip instead when that
 * is impossible here (not x86_64 Linux, not root with packages missing, apt failing, ...).
 * Memoized per process.
 */
export function prepareXen(): Promise<XenHarness | string> {
  prepared ??= prepare().catch((e) => {
    if (e instanceof Skip) return e.message;
    throw e;
  });
  return prepared;
}

async function prepare(): Promise<XenHarness> {
  if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") {
    throw new Skip(
      `the Xen harness needs x86_64 Linux (this is ${Deno.build.arch} ${Deno.build.os})`,
    );
  }
  if (!which("apt-get") || !which("dpkg")) throw new Skip("the Xen harness needs apt-get and dpkg");
  await ensureHostPackages();
  const qemu = which("qemu-system-x86_64")!;
  try {
    Deno.mkdirSync(XEN_CACHE_DIR, { recursive: true });
  } catch (e) {
    throw new Skip(`cannot create ${XEN_CACHE_DIR} (root builds it): ${(e as Error).message}`);
  }
  const versions = await resolvePackages();
  const kernelPkg = Object.keys(versions).find((n) => n.startsWith("linux-image-"))!;
  const pkgKey = sha(
    Object.entries(versions).sort(([a], [b]) => a.localeCompare(b)).map(([n, v]) => `${n}=${v}\n`)
      .join(""),
  );

  // One builder at a time. Without write access (not root) a finished cache is still usable;
  // anything that would have to be built then fails with PermissionDenied, reported as a skip.
  let lock: Deno.FsFile | null = null;
  try {
    lock = await Deno.open(`${XEN_CACHE_DIR}/.lock`, { write: true, create: true });
    await lock.lock(true);
  } catch (e) {
    if (!(e instanceof Deno.errors.PermissionDenied)) throw e;
  }
  try {
    for (const e of Deno.readDirSync(XEN_CACHE_DIR)) {
      if (lock && /^(build|unpacked)-.*\.tmp-\d+$/.test(e.name)) {
        await rmrf(`${XEN_CACHE_DIR}/${e.name}`);
      }
    }
    const xvdtest = await xvdtestPath();
    const debs = await downloadDebs(versions);
    const un = await unpack(pkgKey, debs, kernelPkg);
    const host = await hostFiles(un);
    const buildKey = sha(
      `recipe ${RECIPE}\n${pkgKey}\n`,
      ...["dom0_init.sh", "domu_init.sh"].map((f) => Deno.readFileSync(`${HERE}${f}`)),
      xvdtest.split("/").pop()!, // its name holds the source's hash
      fingerprint([
        host.busybox,
        host.bash,
        host.ldconfig,
        host.mke2fs,
        host.e2fsck,
        ...host.dom0Libs,
        ...host.domuLibs,
      ]),
    );
    const dir = `${XEN_CACHE_DIR}/build-${buildKey}`;
    const harness: XenHarness = {
      dir,
      xen: `${dir}/xen`,
      kernel: `${dir}/vmlinux`,
      kernelRelease: un.kernelRelease,
      dom0Initrd: `${dir}/dom0.cpio`,
      domuInitrd: `${dir}/domu.cpio`,
      packages: versions,
      qemu,
      xvdtest,
    };
    if (!exists(`${dir}/ok`)) {
      if (!isRoot()) throw new Skip(`${dir} is not built yet, and building it needs root`);
      await build(harness, un, host);
      await prune(debs, un, dir);
    }
    const now = new Date();
    try {
      Deno.utimeSync(dir, now, now); // most recently used (prune keeps the newest builds)
    } catch { /* read-only cache */ }
    return harness;
  } catch (e) {
    if (e instanceof Deno.errors.PermissionDenied) {
      throw new Skip(`cannot write ${XEN_CACHE_DIR} (root builds it): ${e.message}`);
    }
    throw e;
  } finally {
    lock?.close();
  }
}

/** Drops what older package versions or harness sources left in the cache: .debs and unpacked
 * trees of other versions, all but the three most recently used builds. */
async function prune(debs: Record<string, string>, un: Unpacked, build: string): Promise<void> {
  const keep = new Set(Object.values(debs).map((f) => f.split("/").pop()!));
  for (const e of Deno.readDirSync(`${XEN_CACHE_DIR}/debs`)) {
    if (e.name.endsWith(".deb") && !keep.has(e.name)) await rmrf(`${XEN_CACHE_DIR}/debs/${e.name}`);
  }
  const unpacked = un.xenRoot.replace(/\/xen$/, "");
  const builds: { path: string; mtime: number }[] = [];
  for (const e of Deno.readDirSync(XEN_CACHE_DIR)) {
    const path = `${XEN_CACHE_DIR}/${e.name}`;
    if (/^unpacked-[0-9a-f]+$/.test(e.name) && path !== unpacked) await rmrf(path);
    if (/^build-[0-9a-f]+$/.test(e.name) && path !== build) {
      builds.push({ path, mtime: Deno.statSync(path).mtime?.getTime() ?? 0 });
    }
  }
  builds.sort((a, b) => b.mtime - a.mtime);
  for (const b of builds.slice(2)) await rmrf(b.path);
}

async function build(h: XenHarness, un: Unpacked, host: HostFiles): Promise<void> {
  const tmp = `${h.dir}.tmp-${Deno.pid}`;
  await rmrf(tmp);
  await rmrf(h.dir);
  Deno.mkdirSync(tmp, { recursive: true });
  Deno.copyFileSync(un.xen, `${tmp}/xen`);
  await extractVmlinux(`${un.kernelRoot}/boot/vmlinuz-${un.kernelRelease}`, `${tmp}/vmlinux`);

  // domU
  const domuMods = resolveModules(
    un.kernelRoot,
    un.kernelRelease,
    DOMU_MODULES.map(([m]) => m),
  );
  const domuParams = new Map(domuMods.map((m) => [m.name, ""]));
  for (const [m, p] of DOMU_MODULES) domuParams.set(modName(m), p);
  const domu = new Archive();
  baseImage(domu, host, host.domuLibs, domuMods, domuParams, h.xvdtest);
  domu.file("init", `${HERE}domu_init.sh`, 0o755);
  await domu.write(`${tmp}/domu.cpio`);

  // dom0
  const dom0Mods = resolveModules(un.kernelRoot, un.kernelRelease, [
    ...DOM0_MODULES,
    ...DOM0_EXTRA_MODULES,
  ]);
  const extra = new Set(DOM0_EXTRA_MODULES.map(modName));
  const dom0Params = new Map(dom0Mods.filter((m) => !extra.has(m.name)).map((m) => [m.name, ""]));
  const dom0 = new Archive();
  dom0.tree("", un.xenRoot, XEN_TREE_SKIP);
  baseImage(dom0, host, host.dom0Libs, dom0Mods, dom0Params, h.xvdtest);
  dom0.file("bin/bash", host.bash, 0o755);
  dom0.link("usr/bin/bash", "/bin/bash");
  dom0.file("sbin/ldconfig", host.ldconfig, 0o755);
  dom0.text("etc/ld.so.conf", ARCH_LIBS.join("\n") + "\n");
  dom0.link("var/run", "../run");
  dom0.file("boot/vmlinux", `${tmp}/vmlinux`, 0o644);
  dom0.file("boot/domu.cpio", `${tmp}/domu.cpio`, 0o644);
  dom0.file("init", `${HERE}dom0_init.sh`, 0o755);
  await dom0.write(`${tmp}/dom0.cpio`);

  Deno.writeTextFileSync(
    `${tmp}/ok`,
    JSON.stringify(
      {
        packages: h.packages,
        kernelRelease: un.kernelRelease,
        dom0Modules: dom0Mods.map((m) => m.name),
      },
      null,
      1,
    ),
  );
  Deno.renameSync(tmp, h.dir);
}

// ---------------------------------------------------------------------------------------------
// runXen

const shq = (s: string): string => `'${s.replaceAll("'", `'\\''`)}'`;
const qemuOpt = (s: string): string => s.replaceAll(",", ",,");

/**
 * Boots QEMU → Xen → dom0 and runs `opts.dom0Script` there (see docs/xen-harness.md for what
 * the script can use). Resolves when QEMU exits: after the script, dom0 prints
 * "TAPD-DOM0 DONE status=N" and powers off; at `timeoutMs` QEMU is killed.
 */
export async function runXen(h: XenHarness, opts: XenRunOptions): Promise<XenRun> {
  const work = Deno.realPathSync(opts.work);
  const env: string[] = [
    `TAPD_HOST_REPO=${shq(REPO_ROOT)}`,
    "export TAPD_HOST_REPO",
    `TAPD_DENO_CACHE=${opts.denoCache === false ? 0 : 1}`,
  ];
  for (const [k, v] of Object.entries(opts.env ?? {})) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) throw new Error(`bad environment name ${k}`);
    env.push(`${k}=${shq(v)}`, `export ${k}`);
  }
  Deno.writeTextFileSync(`${work}/harness.env`, env.join("\n") + "\n");
  Deno.writeTextFileSync(`${work}/dom0.sh`, opts.dom0Script);
  const guests = (opts.guests ?? []).map((g) => {
    if (!/^[A-Za-z0-9_.-]+$/.test(g.name)) throw new Error(`bad guest name ${g.name}`);
    return `start_guest ${[g.name, g.mode, ...(g.args ?? [])].map(shq).join(" ")} || exit 1\n`;
  });
  Deno.writeTextFileSync(`${work}/guests.sh`, guests.join(""));

  const echo = opts.echo ?? Deno.env.get("TAPD_XEN_ECHO") === "1";
  const cpus = opts.cpus ?? Number(Deno.env.get("TAPD_XEN_CPUS") ?? 2);
  const denoCache = opts.denoCache ?? true;
  const denoTar = `${XEN_CACHE_DIR}/deno-dir.tar`;
  const denoNew = `${work}/.deno-dir.tar.new`;
  await rmrf(denoNew);
  await rmrf(`${work}/.deno-dir.tar`);
  if (denoCache && exists(denoTar)) Deno.copyFileSync(denoTar, `${work}/.deno-dir.tar`);
  const args = [
    "-accel",
    "tcg",
    "-cpu",
    "Nehalem",
    "-m",
    "2048",
    "-smp",
    String(cpus),
    "-nographic",
    "-no-reboot",
    "-nic",
    "none",
    "-kernel",
    h.xen,
    "-append",
    "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M noreboot",
    "-initrd",
    `${h.kernel} console=hvc0 earlyprintk=xen panic=-1 quiet,${h.dom0Initrd}`,
    "-virtfs",
    `local,path=${qemuOpt(REPO_ROOT)},mount_tag=repo,security_model=none,readonly=on`,
    "-virtfs",
    `local,path=${qemuOpt(work)},mount_tag=work,security_model=none`,
  ];
  for (const d of opts.disks ?? []) {
    args.push("-drive", `file=${qemuOpt(Deno.realPathSync(d))},format=raw,if=virtio,cache=none`);
  }
  const start = performance.now();
  const child = new Deno.Command(h.qemu, {
    args,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      child.kill("SIGKILL");
    } catch { /* already gone */ }
  }, opts.timeoutMs);

  let text = "";
  let partial = "";
  const marks: XenMark[] = [];
  const dec = new TextDecoder();
  const readOut = (async () => {
    for await (const chunk of child.stdout) {
      if (echo) Deno.stderr.writeSync(chunk);
      const s = partial + dec.decode(chunk, { stream: true }).replaceAll("\r", "");
      const lines = s.split("\n");
      partial = lines.pop()!;
      const ms = Math.round(performance.now() - start);
      for (const l of lines) {
        text += l + "\n";
        if (l.startsWith("TAPD-")) marks.push({ ms, line: l });
      }
    }
    text += partial;
  })();
  const readErr = new Response(child.stderr).text();
  const [status] = await Promise.all([child.status, readOut]);
  clearTimeout(timer);
  const qemuStderr = await readErr;
  const durationMs = Math.round(performance.now() - start);
  await rmrf(`${work}/.deno-dir.tar`);
  if (exists(denoNew)) {
    if (denoCache && !timedOut && status.code === 0) {
      try {
        const tmp = `${denoTar}.tmp-${Deno.pid}`;
        Deno.copyFileSync(denoNew, tmp);
        Deno.renameSync(tmp, denoTar);
      } catch { /* the cache is not writable: keep going without */ }
    }
    await rmrf(denoNew);
  }

  const markMs = (re: RegExp) => marks.find((m) => re.test(m.line))?.ms ?? null;
  const ready = markMs(/^TAPD-DOM0 READY/);
  const done = markMs(/^TAPD-DOM0 DONE/);
  const doneLine = marks.find((m) => /^TAPD-DOM0 DONE/.test(m.line))?.line;
  const exitStatus = doneLine ? Number(doneLine.match(/status=(\d+)/)?.[1] ?? NaN) : null;
  const reports: Record<string, string> = {};
  for (const m of text.matchAll(/^TAPD-REPORT ([^=\n]+)=(.*)$/gm)) reports[m[1]] = m[2];
  const guestResults: GuestResult[] = [];
  for (const m of text.matchAll(/^\[guest ([^\]]+)\] TAPD-GUEST RESULT (ok|fail) ?(.*)$/gm)) {
    guestResults.push({ guest: m[1], ok: m[2] === "ok", detail: m[3] });
  }
  return {
    console: text,
    ok: !timedOut && exitStatus === 0 && status.code === 0,
    status: exitStatus === null || Number.isNaN(exitStatus) ? null : exitStatus,
    timedOut,
    durationMs,
    bootMs: ready,
    scriptMs: ready !== null && done !== null ? done - ready : null,
    reports,
    guestResults,
    marks,
    qemuStderr,
    qemuExitCode: timedOut ? null : status.code,
  };
}

// ---------------------------------------------------------------------------------------------
// By hand: deno run -A tests/xen/harness.ts [options] SCRIPT   (see docs/xen-harness.md)

async function main(args: string[]): Promise<number> {
  const usage = "usage: deno run -A tests/xen/harness.ts [--work DIR] [--disk MIB]... " +
    "[--guest NAME:MODE[:WORD...]]... [--timeout SECONDS] [--cpus N] [--quiet] SCRIPT|-e TEXT";
  let work: string | null = null;
  let script: string | null = null;
  let timeout = 600;
  let cpus: number | undefined;
  let echo = true;
  const disks: number[] = [];
  const guests: XenGuest[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    const next = () => {
      if (i + 1 >= args.length) throw new Error(`${a} needs a value\n${usage}`);
      return args[++i];
    };
    if (a === "--work") work = next();
    else if (a === "--disk") disks.push(Number(next()));
    else if (a === "--guest") {
      const [name, mode, ...words] = next().split(":");
      guests.push({ name, mode: mode ?? "idle", args: words });
    } else if (a === "--timeout") timeout = Number(next());
    else if (a === "--cpus") cpus = Number(next());
    else if (a === "--quiet") echo = false;
    else if (a === "-e") script = next();
    else if (!a.startsWith("-") && script === null) script = Deno.readTextFileSync(a);
    else throw new Error(usage);
  }
  if (script === null) throw new Error(usage);
  const h = await prepareXen();
  if (typeof h === "string") {
    console.error(`cannot run the Xen harness: ${h}`);
    return 2;
  }
  work ??= Deno.makeTempDirSync({ dir: "/var/tmp", prefix: "tapd-xenrun-" });
  const diskPaths = disks.map((mib, i) => {
    const path = `${work}/disk${i}.raw`;
    Deno.writeFileSync(path, new Uint8Array(0));
    Deno.truncateSync(path, mib * 1024 * 1024);
    return path;
  });
  const run = await runXen(h, {
    dom0Script: script,
    work,
    timeoutMs: timeout * 1000,
    guests,
    disks: diskPaths,
    echo,
    cpus,
  });
  const { console: _, marks: __, ...summary } = run;
  console.log(JSON.stringify({ work, ...summary }, null, 1));
  return run.ok ? 0 : 1;
}

if (import.meta.main) Deno.exit(await main(Deno.args));
