/**
 * Where the image tools write: a destination is never overwritten unless the user says so, and a
 * file is built under a temporary name (DEST.partial-XXXXXX) that becomes DEST only once it is
 * complete, so a failure (or Ctrl-C) part-way leaves no half-written DEST behind.
 */
import { FileHandle } from "../ffi/file.ts";
import { O_CREAT, O_EXCL, O_RDWR } from "../ffi/constants.ts";
import { SysError } from "../ffi/errno.ts";
import { lockImagePath } from "../drivers/image_lock.ts";

/** What is at a destination path now. */
export type Existing = "none" | "file" | "block-device";

/** The error for a destination that exists, when overwriting was not asked for. */
export function existsError(path: string, flag: string): Error {
  return new Error(`"${path}" already exists: use ${flag} to overwrite it`);
}

/**
 * Checks a destination: refuses directories and other non-files, refuses an existing one without
 * `force`, and block devices unless `allowDevice`.
 */
export function checkDestination(
  path: string,
  options: { force: boolean; flag: string; allowDevice: boolean },
): Existing {
  let info: Deno.FileInfo;
  try {
    info = Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      try {
        Deno.lstatSync(path); // a dangling symlink: creating through it is surprising
      } catch (e2) {
        if (e2 instanceof Deno.errors.NotFound) return "none";
        throw e2;
      }
      throw new Error(`"${path}" is a dangling symbolic link`);
    }
    throw e;
  }
  if (info.isDirectory) throw new Error(`"${path}" is a directory`);
  const kind: Existing = info.isFile ? "file" : info.isBlockDevice ? "block-device" : "none";
  if (kind === "none") throw new Error(`"${path}" is neither a regular file nor a block device`);
  if (kind === "block-device" && !options.allowDevice) {
    throw new Error(`"${path}" is a block device: this tool writes image files only`);
  }
  if (!options.force) throw existsError(path, options.flag);
  // Not an image another process (a VM, qemu-nbd, a tapd disk) has open: its writes would be lost.
  lockImagePath(path, { readOnly: false })[Symbol.dispose]();
  return kind;
}

/** Whether two paths name the same file (the same device and inode). */
export function sameFile(a: string, b: string): boolean {
  try {
    const x = Deno.statSync(a), y = Deno.statSync(b);
    return x.dev === y.dev && x.ino !== null && x.ino === y.ino;
  } catch {
    return false;
  }
}

const active = new Set<PartialFile>();
const SIGNALS: readonly [Deno.Signal, number][] = [["SIGINT", 130], ["SIGTERM", 143]];
const handlers = new Map<Deno.Signal, () => void>();

function watchSignals(on: boolean): void {
  for (const [signal, code] of SIGNALS) {
    if (on && !handlers.has(signal)) {
      const handler = () => {
        for (const p of active) p.abort();
        Deno.exit(code);
      };
      handlers.set(signal, handler);
      Deno.addSignalListener(signal, handler);
    } else if (!on && handlers.has(signal)) {
      Deno.removeSignalListener(signal, handlers.get(signal)!);
      handlers.delete(signal);
    }
  }
}

/** A file being written under a temporary name next to its destination. */
export class PartialFile {
  readonly dest: string;
  readonly path: string;
  readonly file: FileHandle;
  #done = false;

  private constructor(dest: string, path: string, file: FileHandle) {
    this.dest = dest;
    this.path = path;
    this.file = file;
  }

  /** Creates DEST.partial-XXXXXX (mode 0644 less the umask). */
  static create(dest: string): PartialFile {
    for (let attempt = 0;; attempt++) {
      const suffix = crypto.getRandomValues(new Uint8Array(3)).reduce(
        (s, b) => s + b.toString(16).padStart(2, "0"),
        "",
      );
      const path = `${dest}.partial-${suffix}`;
      try {
        const p = new PartialFile(dest, path, FileHandle.open(path, O_RDWR | O_CREAT | O_EXCL));
        active.add(p);
        watchSignals(true);
        return p;
      } catch (e) {
        if (!(e instanceof SysError)) throw e;
        if (attempt < 5 && e.code === "EEXIST") continue;
        throw new SysError(e.errno, "open", dest); // name the file the user asked for
      }
    }
  }

  /**
   * Closes the file and gives it its final name. Without `force` this never replaces a file
   * that appeared at DEST meanwhile (a hard link fails if DEST exists).
   */
  commit(force: boolean, flag: string): void {
    this.file.close();
    if (force) {
      Deno.renameSync(this.path, this.dest);
    } else {
      try {
        Deno.linkSync(this.path, this.dest);
        Deno.removeSync(this.path);
      } catch (e) {
        if (e instanceof Deno.errors.AlreadyExists) throw existsError(this.dest, flag);
        // No hard links on this file system: check again, then rename.
        if (exists(this.dest)) throw existsError(this.dest, flag);
        Deno.renameSync(this.path, this.dest);
      }
    }
    this.#finish();
  }

  /** Closes and removes the temporary file. Idempotent; does nothing after commit. */
  abort(): void {
    if (this.#done) return;
    try {
      this.file.close();
    } catch { /* already closed */ }
    try {
      Deno.removeSync(this.path);
    } catch { /* already gone */ }
    this.#finish();
  }

  #finish(): void {
    this.#done = true;
    active.delete(this);
    if (active.size === 0) watchSignals(false);
  }
}

function exists(path: string): boolean {
  try {
    Deno.lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * Runs `fill` on a new partial file for `dest` and commits it, or removes it when `fill` fails.
 */
export async function writeAtomically(
  dest: string,
  force: boolean,
  flag: string,
  fill: (p: PartialFile) => Promise<void>,
): Promise<void> {
  const p = PartialFile.create(dest);
  try {
    await fill(p);
    p.commit(force, flag);
  } finally {
    p.abort();
  }
}
