/**
 * Image locks between processes, as QEMU takes them (its file-posix driver), so that tapd, QEMU
 * (a VM, qemu-nbd, qemu-img, qemu-storage-daemon) and other tapd processes keep each other from
 * writing an image another one uses: two allocators on one qcow image corrupt it.
 *
 * The protocol is byte-range locks on the image file itself, open file description locks, all
 * shared (F_RDLCK), one byte per permission: byte 100 + p says "I use permission p", byte 200 + p
 * "I do not let anyone else use permission p". The permissions tapd needs, by QEMU's numbering:
 * 0 consistent read, 1 write, 3 resize. A disk open for writing uses consistent read and write
 * (and resize, for the formats that grow their file) and shares neither write nor resize; a
 * read-only disk (and every backing file) uses consistent read and shares neither; `forceShare`
 * (qemu-img's -U) uses consistent read and shares everything; a ram disk that writes its file
 * back shares writing with the other users of its memory. These are qemu-nbd's sets for a qcow2
 * image, so `qemu-img info` on an image tapd writes says `Failed to get shared "write" lock`, and
 * tapd refuses an image a VM writes. A conflict is another description holding the byte opposite one
 * of ours, found after ours are set (so two openers at once cannot both miss each other).
 *
 * Within one process the locks are the union of its openers' (one lock descriptor per file):
 * a disk reopened on an overlay of its own image (`resume --reopen`) holds both while it
 * switches. Where the file system has no such locks (some network file systems), none are taken.
 */
import { EACCES, EAGAIN, ENOENT, F_RDLCK, F_UNLCK, O_RDONLY } from "../ffi/constants.ts";
import { SysError } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { ImageLockError } from "./errors.ts";

export { ImageLockError };

const PERM_BASE = 100;
const SHARED_BASE = 200;
const CONSISTENT_READ = 0, WRITE = 1, RESIZE = 3;
const NAMES: Readonly<Record<number, string>> = {
  [CONSISTENT_READ]: "consistent read",
  [WRITE]: "write",
  [RESIZE]: "resize",
};

export interface LockOptions {
  readOnly: boolean;
  /** Use the image even while another process writes it (reads may then see it changing). */
  forceShare?: boolean;
  /** A writer that may grow the file (a qcow, VHD or VMDK image; not raw): the resize permission. */
  grows?: boolean;
  /**
   * A writer that shares writing (ram disks with `persist`: every user of one memory object
   * writes the file back): writers that do not share it are still kept out.
   */
  sharesWrite?: boolean;
}

interface Need {
  /** Permissions used, and permissions not shared (QEMU's bit numbers). */
  uses: readonly number[];
  unshares: readonly number[];
}

function needOf(options: LockOptions): Need {
  if (options.readOnly) {
    return { uses: [CONSISTENT_READ], unshares: options.forceShare ? [] : [WRITE, RESIZE] };
  }
  const uses = options.grows ? [CONSISTENT_READ, WRITE, RESIZE] : [CONSISTENT_READ, WRITE];
  return { uses, unshares: options.sharesWrite ? [RESIZE] : [WRITE, RESIZE] };
}

/** One file's locks in this process: a descriptor of its own and the needs of its openers. */
interface FileLocks {
  file: FileHandle;
  needs: Need[];
  /** The bytes locked now. */
  held: Set<number>;
}

const files = new Map<string, FileLocks>();

function bytesOf(needs: readonly Need[]): Set<number> {
  const bytes = new Set<number>();
  for (const need of needs) {
    for (const p of need.uses) bytes.add(PERM_BASE + p);
    for (const p of need.unshares) bytes.add(SHARED_BASE + p);
  }
  return bytes;
}

/** Locks `want` and unlocks the rest; false when the file system takes no such locks. */
function apply(entry: FileLocks, want: Set<number>): boolean {
  for (const byte of want) {
    if (entry.held.has(byte)) continue;
    const errno = entry.file.byteLock(byte, F_RDLCK);
    if (errno !== 0) {
      // A shared lock conflicts only with an exclusive one, which QEMU and tapd never take.
      if (errno === EAGAIN) continue;
      return false;
    }
    entry.held.add(byte);
  }
  for (const byte of [...entry.held]) {
    if (want.has(byte)) continue;
    entry.file.byteLock(byte, F_UNLCK);
    entry.held.delete(byte);
  }
  return true;
}

const OTHERS = "a VM, qemu-nbd, qemu-img or a tapd disk?";

function opening(path: string, options: LockOptions): string {
  return `Cannot open "${path}"${options.readOnly ? "" : " for writing"}`;
}

/** What another process's locks refuse of `need`, as one clause; null if nothing. */
function conflict(entry: FileLocks, need: Need, options: LockOptions): string | null {
  const file = entry.file;
  for (const p of need.uses) {
    if (!file.byteLocked(SHARED_BASE + p)) continue;
    if (p === WRITE && file.byteLocked(PERM_BASE + WRITE)) {
      return `another process writes it (it holds the image's "write" lock: ` +
        `${OTHERS}); stop that first`;
    }
    const hint = p === WRITE ? "stop that first, or open the image read-only" : "stop that first";
    return `another process uses it and lets nobody ` +
      `${p === WRITE ? "write" : p === RESIZE ? "resize" : "read"} it (it holds the image's ` +
      `shared "${NAMES[p]}" lock: ${OTHERS}); ${hint}`;
  }
  for (const p of need.unshares) {
    if (!file.byteLocked(PERM_BASE + p)) continue;
    const hint = options.readOnly
      ? "stop that first, or read it anyway with --force-share (-U) where the command has it"
      : "stop that first";
    return `another process ${p === WRITE ? "writes" : "may resize"} it (it holds ` +
      `the image's "${NAMES[p]}" lock: ${OTHERS}); ${hint}`;
  }
  return null;
}

/**
 * Takes the locks `options` needs on the file `file` is open on, for as long as `file` stays
 * open (released when it is closed). Throws an ImageLockError naming the path when another
 * process's locks refuse them; `file` is left open then.
 */
export function lockImageFile(file: FileHandle, path: string, options: LockOptions): void {
  const release = lockFile(file, path, options);
  if (release !== null) file.afterClose(release);
}

/**
 * The same for a command that uses an image through descriptors of its own (`tapd check`, a
 * destination about to be replaced): the locks are held until the returned handle is disposed.
 */
export function lockImagePath(path: string, options: LockOptions): Disposable {
  const file = FileHandle.open(path, O_RDONLY);
  try {
    lockImageFile(file, path, options);
    return file;
  } catch (e) {
    file.close();
    throw e;
  }
}

function lockFile(file: FileHandle, path: string, options: LockOptions): (() => void) | null {
  if (options.forceShare && !options.readOnly) {
    throw new ImageLockError(
      `Cannot open "${path}" for writing with --force-share`,
      "it is only for reading",
    );
  }
  const identity = file.stat().identity;
  const need = needOf(options);
  let entry = files.get(identity);
  const created = entry === undefined;
  if (entry === undefined) {
    let own: FileHandle;
    try {
      own = FileHandle.open(`/proc/self/fd/${file.fd}`, O_RDONLY);
    } catch (e) {
      // No /proc, or a file we may write but not read: no locks rather than no disk.
      if (e instanceof SysError && (e.errno === ENOENT || e.errno === EACCES)) return null;
      throw e;
    }
    entry = { file: own, needs: [], held: new Set() };
  }
  entry.needs.push(need);
  const drop = (): void => {
    entry.needs.splice(entry.needs.indexOf(need), 1);
    if (entry.needs.length > 0) {
      apply(entry, bytesOf(entry.needs));
      return;
    }
    files.delete(identity);
    entry.file.close(); // its locks go with it
  };
  try {
    if (!apply(entry, bytesOf(entry.needs))) {
      if (created) entry.file.close();
      else entry.needs.pop();
      return null;
    }
    if (created) files.set(identity, entry);
    let refused: string | null;
    try {
      refused = conflict(entry, need, options);
    } catch (e) {
      // F_OFD_GETLK refused where F_OFD_SETLK worked (a network file system): nothing to see.
      if (!(e instanceof SysError)) throw e;
      refused = null;
    }
    if (refused !== null) throw new ImageLockError(opening(path, options), refused);
  } catch (e) {
    if (files.get(identity) === entry) drop();
    else entry.file.close();
    throw e;
  }
  return drop;
}
