/**
 * Mounting and unmounting a file-root FUSE file system without libfuse or a helper binary
 * (protocols.md §16, §22): mount(2) with `rootmode=100000` over an existing regular file, which
 * then *is* the disk; finding a mount in /proc/self/mountinfo; and aborting the FUSE connection
 * behind a mount point through fusectl, for when the serving process is gone or stuck.
 */
import { check, pooled, SysError } from "../ffi/errno.ts";
import { cString, libc } from "../ffi/libc.ts";
import { EINVAL, ENOENT } from "../ffi/constants.ts";

const MS_RDONLY = 0x1;
const MS_NOSUID = 0x2;
const MS_NODEV = 0x4;
const MNT_DETACH = 2;
const EBUSY = 16;

/** The file system type tapd's mounts show in /proc/mounts (`fuse.SUBTYPE`). */
export const FUSE_TYPE = "fuse.tapd";
const FUSECTL_DIR = "/sys/fs/fuse/connections";

/** A mount point that cannot be used, or a mount that cannot be undone; one line. */
export class MountError extends Error {
  override name = "MountError";
  /** The errno that best describes it (ENOENT, EBUSY, EEXIST …). */
  readonly errno: number;

  constructor(errno: number, message: string) {
    super(message);
    this.errno = errno;
  }
}

/** One line of /proc/self/mountinfo (the fields tapd uses). */
export interface MountInfo {
  mountId: number;
  major: number;
  minor: number;
  mountPoint: string;
  fsType: string;
  source: string;
}

function unescapeMountField(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** Parses /proc/self/mountinfo text. */
export function parseMountInfo(text: string): MountInfo[] {
  const mounts: MountInfo[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const fields = line.split(" ");
    const dash = fields.indexOf("-", 6);
    if (fields.length < 10 || dash < 0) continue;
    const [major, minor] = fields[2].split(":").map(Number);
    mounts.push({
      mountId: Number(fields[0]),
      major,
      minor,
      mountPoint: unescapeMountField(fields[4]),
      fsType: fields[dash + 1],
      source: unescapeMountField(fields[dash + 2] ?? ""),
    });
  }
  return mounts;
}

/**
 * The absolute path of `path` with its directories resolved but not the last component, which
 * may be a mount point whose file system is dead (stat on it fails with ENOTCONN).
 */
export function resolveMountPoint(path: string): string {
  const trimmed = path.length > 1 ? path.replace(/\/+$/, "") : path;
  const slash = trimmed.lastIndexOf("/");
  const dir = slash < 0 ? "." : slash === 0 ? "/" : trimmed.slice(0, slash);
  const base = trimmed.slice(slash + 1);
  let real: string;
  try {
    real = Deno.realPathSync(dir);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new MountError(ENOENT, `Cannot mount on "${path}": directory "${dir}" does not exist`);
    }
    throw e;
  }
  if (base === "" || base === "." || base === "..") return Deno.realPathSync(trimmed);
  return real === "/" ? `/${base}` : `${real}/${base}`;
}

/** The topmost mount at `path` (already resolved), or null when nothing is mounted there. */
export function findMount(path: string): MountInfo | null {
  const mounts = parseMountInfo(Deno.readTextFileSync("/proc/self/mountinfo"));
  for (let i = mounts.length - 1; i >= 0; i--) {
    if (mounts[i].mountPoint === path) return mounts[i];
  }
  return null;
}

/** What a mount point must look like: an existing regular file with nothing mounted on it. */
export interface MountPointInfo {
  /** The resolved path. */
  path: string;
  mode: number;
  uid: number;
  gid: number;
  atime: Date | null;
  mtime: Date | null;
}

/** Checks that `path` can take a file-root mount; one-line errors otherwise. */
export function checkMountPoint(path: string): MountPointInfo {
  const resolved = resolveMountPoint(path);
  const mounted = findMount(resolved);
  if (mounted !== null) {
    throw new MountError(
      EBUSY,
      `Cannot mount on "${path}": it is already a mount point (${mounted.fsType} from ` +
        `"${mounted.source}"); unmount it first` +
        (mounted.fsType.startsWith("fuse") ? " (a dead FUSE mount needs `umount -l`)" : ""),
    );
  }
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(resolved);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new MountError(
        ENOENT,
        `Cannot mount on "${path}": no such file (create it first: the mount point of a FUSE ` +
          `export is an existing regular file, e.g. \`touch ${path}\`)`,
      );
    }
    throw e;
  }
  if (!info.isFile) {
    throw new MountError(
      EINVAL,
      `Cannot mount on "${path}": not a regular file (the mount point of a FUSE export is an ` +
        `existing regular file)`,
    );
  }
  return {
    path: resolved,
    mode: (info.mode ?? 0o100644) & 0o7777,
    uid: info.uid ?? 0,
    gid: info.gid ?? 0,
    atime: info.atime,
    mtime: info.mtime,
  };
}

/** Options of one file-root FUSE mount. */
export interface FuseMountOptions {
  /** The open /dev/fuse descriptor that will serve it. */
  fd: number;
  readOnly: boolean;
  /** Largest READ on the direct-I/O path. */
  maxRead: number;
  /** Shown as the mount's source in /proc/mounts. */
  source: string;
}

/**
 * mount(2) of a file-root FUSE file system at `path` (already checked and resolved). Returns
 * before the kernel's INIT request is answered: nothing may touch the mount point until then.
 */
export function mountFuse(path: string, options: FuseMountOptions): void {
  const data = [
    `fd=${options.fd}`,
    "rootmode=100000",
    `user_id=${Deno.uid() ?? 0}`,
    `group_id=${Deno.gid() ?? 0}`,
    "allow_other",
    "default_permissions",
    `max_read=${options.maxRead}`,
  ].join(",");
  const flags = MS_NOSUID | MS_NODEV | (options.readOnly ? MS_RDONLY : 0);
  check(
    libc.mount(
      cString(options.source.replaceAll(",", "_")),
      cString(path),
      cString(FUSE_TYPE),
      BigInt(flags),
      cString(data),
    ),
    "mount",
    path,
  );
}

/**
 * umount2(path, 0), on the thread pool (the kernel may need this process to answer requests
 * while it unmounts). EBUSY becomes a one-line MountError saying what to do.
 */
export async function unmount(path: string): Promise<void> {
  const target = cString(path);
  try {
    await pooled("umount", path, () => libc.umount2_nb(target, 0), () => libc.umount2(target, 0));
  } catch (e) {
    if (!(e instanceof SysError && e.errno === EBUSY)) throw e;
    throw new MountError(
      EBUSY,
      `Cannot unmount "${path}": the file is in use (an attached loop device or an open ` +
        `descriptor): detach or close it first (losetup -d, umount)`,
    );
  }
}

/** umount2(path, MNT_DETACH): gone from the namespace now, released when its last user goes. */
export function unmountLazily(path: string): void {
  check(libc.umount2(cString(path), MNT_DETACH), "umount2(MNT_DETACH)", path);
}

/** The fusectl directory of the connection behind a mount (named by its kernel dev_t). */
export function connectionDir(mount: MountInfo): string {
  // The kernel's dev_t: major in the bits above 20, minor below.
  return `${FUSECTL_DIR}/${mount.major * 0x100000 + mount.minor}`;
}

function ensureFusectl(): void {
  const mounts = parseMountInfo(Deno.readTextFileSync("/proc/self/mountinfo"));
  if (mounts.some((m) => m.fsType === "fusectl")) return;
  check(
    libc.mount(cString("fusectl"), cString(FUSECTL_DIR), cString("fusectl"), 0n, cString("")),
    "mount(fusectl)",
    FUSECTL_DIR,
  );
}

/**
 * Aborts the FUSE connection behind `mount` through fusectl (mounted first if need be): every
 * request waiting on it fails at once, and its server's reads of /dev/fuse end.
 */
export function abortConnection(mount: MountInfo): void {
  ensureFusectl();
  try {
    Deno.writeTextFileSync(`${connectionDir(mount)}/abort`, "1");
  } catch (e) {
    // Already gone: the kernel removes the directory once the connection is released.
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  }
}

/**
 * Ends the FUSE mount at `path` whatever state its server is in (dead, stuck, killed): writes
 * the connection's fusectl `abort` file, so every request waiting on it fails at once and no
 * process stays in D state, then unmounts lazily. Returns false when no FUSE file system
 * is mounted at `path`. Synchronous. For the daemon, when a child serving a FUSE export dies.
 */
export function abortFuseMount(path: string): boolean {
  const resolved = resolveMountPoint(path);
  const mount = findMount(resolved);
  if (mount === null || !(mount.fsType === "fuse" || mount.fsType.startsWith("fuse."))) {
    return false;
  }
  abortConnection(mount);
  unmountLazily(resolved);
  return true;
}
