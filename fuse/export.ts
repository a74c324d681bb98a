/**
 * The FUSE export: one disk mounted as one regular file (docs/fuse.md). An existing regular file
 * is the mount point (like qemu-storage-daemon's fuse export): after mount() the file at PATH is
 * the disk, sized to it, writable unless the disk or the export is read-only, and usable with
 * `losetup --direct-io=on`, `dd`, `qemu-img` or anything else that takes a file.
 *
 *   const fuse = new FuseExport(disk, "/run/vm.img", { log });
 *   await fuse.mount();      // resolves once the kernel's INIT is answered
 *   …
 *   await fuse.close();      // unmounts (waiting up to 5 s for users), answers what is in flight
 */
import { type Logger, silentLogger } from "../cli/log.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { O_RDONLY, O_RDWR } from "../ffi/constants.ts";
import { SysError } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { FileAttributes } from "./attributes.ts";
import { FuseDevice, setIoFlusher } from "./device.ts";
import {
  abortConnection,
  checkMountPoint,
  findMount,
  MountError,
  mountFuse,
  type MountInfo,
  unmount,
  unmountLazily,
} from "./mount.ts";
import { MAX_IO } from "./protocol.ts";
import { FuseSession } from "./session.ts";
import { DEFAULT_IO_THREADS, IoThreads } from "./io_threads.ts";
import { enableUring, FuseUring } from "./uring.ts";
import type { DirectAccess } from "../drivers/direct_access.ts";

export { abortFuseMount, MountError } from "./mount.ts";

export interface FuseExportOptions {
  /** Refuse writes even if the target accepts them (the mount is read-only too). */
  readOnly?: boolean;
  log?: Logger;
  /**
   * Bypass the page cache on every open (FOPEN_DIRECT_IO): set it when the disk is also
   * written through another export (NBD), so that readers of the file never see stale pages.
   */
  directIo?: boolean;
  /** Requests in flight at most (default 256). */
  maxRequests?: number;
  /** Look for requests instead of sleeping until this many µs pass without one (default 0). */
  pollMicros?: number;
  /**
   * FUSE passthrough (Linux 6.9+): opens of the file read and write the raw image directly in
   * the kernel, as a loop device on the image would; only the other operations reach tapd. The
   * target must be a raw disk (BlockTarget.passthroughFile); its reads and writes then bypass
   * tapd (no statistics, no pause). Where the kernel refuses, tapd serves everything and says so.
   */
  passthrough?: boolean;
  /**
   * Serve the reads and writes of a raw disk on this many threads (fuse/io_threads.ts), each
   * doing its own blocking I/O on the image; 0 serves everything on the event loop with the
   * disk's I/O engine. Ignored for a mapped disk (qcow, …) and with passthrough. Default
   * DEFAULT_IO_THREADS.
   */
  ioThreads?: number;
  /**
   * FUSE over io_uring (Linux 6.14+, with the fuse module's enable_uring on; fuse/uring.ts): a
   * thread takes every request from io_uring ring entries and serves a raw disk's reads and
   * writes with io_uring I/O, with no system call per request. Where the kernel refuses, tapd
   * serves as without it and says why. Ignored for a mapped disk and with passthrough.
   */
  uring?: boolean;
}

export interface FuseCloseOptions {
  /** How long to keep retrying while the file is in use (default 5000 ms; may be Infinity). */
  graceMs?: number;
  /**
   * When still in use after the grace time: abort the connection and unmount lazily (users get
   * I/O errors) instead of throwing a MountError (EBUSY) and going on serving.
   */
  force?: boolean;
}

const INIT_TIMEOUT_MS = 10_000;
const URING_STOP_MS = 5_000;
const EINVAL = 22;

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

export class FuseExport {
  readonly target: BlockTarget;
  /** The mount point as given. */
  readonly path: string;
  readonly readOnly: boolean;
  readonly #log: Logger;
  readonly #maxRequests: number | undefined;
  readonly #directIo: boolean;
  readonly #pollMicros: number;
  readonly #passthrough: boolean;
  readonly #ioThreads: number;
  #threads: IoThreads | null = null;
  readonly #wantUring: boolean;
  #uring: FuseUring | null = null;
  /** The resolved mount point, once mounted. */
  #mountPoint: string | null = null;
  #mount: MountInfo | null = null;
  #session: FuseSession | null = null;
  #running: Promise<void> | null = null;
  #closing: Promise<void> | null = null;
  readonly #ended = Promise.withResolvers<void>();
  #endedFlag = false;
  #failure: string | null = null;
  /** close() unmounted the file while nobody had it open. */
  #unmountedClean = false;
  /** The target's passthrough file is in use (BlockTarget.passthroughFile). */
  #passthroughLent = false;

  constructor(target: BlockTarget, path: string, options: FuseExportOptions = {}) {
    this.target = target;
    this.path = path;
    this.readOnly = (options.readOnly ?? false) || target.info.readOnly;
    this.#log = (options.log ?? silentLogger).with({ mount: path });
    this.#maxRequests = options.maxRequests;
    this.#directIo = options.directIo ?? false;
    this.#pollMicros = options.pollMicros ?? 0;
    this.#passthrough = options.passthrough ?? false;
    this.#ioThreads = options.ioThreads ?? DEFAULT_IO_THREADS;
    this.#wantUring = (options.uring ?? false) && !this.#passthrough;
  }

  /**
   * Why the export ended the connection itself (a thread failed with requests the kernel
   * waits for), or null.
   */
  get failure(): string | null {
    return this.#failure;
  }

  /** Requests come through io_uring ring entries (FUSE over io_uring). */
  get uring(): boolean {
    return this.#uring !== null;
  }

  /** I/O threads serving reads and writes (0: the event loop serves them). */
  get ioThreads(): number {
    return this.#threads === null ? 0 : this.#ioThreads;
  }

  /** Reads and writes of the file go to the raw image in the kernel (FUSE passthrough). */
  get passthrough(): boolean {
    return this.#session?.passthrough ?? false;
  }

  /**
   * Mounts the disk over the regular file at `path`. Fails with a one-line MountError when
   * the file is missing, not a regular file, or already a mount point.
   */
  async mount(): Promise<void> {
    if (this.#running !== null || this.#closing !== null) {
      throw new Error(`FUSE export "${this.path}" was already mounted`);
    }
    const point = checkMountPoint(this.path);
    const backing = this.#passthrough ? this.#openBacking() : null;
    this.#passthroughLent = backing !== null;
    // Once INIT agrees on io_uring the kernel holds every request until ring entries are
    // registered: agree only for a disk the ring threads can serve.
    const notRaw = "the disk is not a raw image (mapped disks, such as qcow, use /dev/fuse)";
    let uringAccess = this.#wantUring ? this.target.directAccess?.() ?? null : null;
    const uringWhyNot = !this.#wantUring
      ? null
      : uringAccess === null
      ? notRaw
      : enableUring(this.#log);
    let device: FuseDevice | null = null;
    let session: FuseSession;
    try {
      device = new FuseDevice();
      session = new FuseSession(device, this.target, {
        attributes: new FileAttributes({
          size: this.target.size,
          mode: point.mode,
          uid: point.uid,
          gid: point.gid,
          readOnly: this.readOnly,
          mtime: point.mtime,
        }),
        readOnly: this.readOnly,
        directIo: this.#directIo,
        log: this.#log,
        maxRequests: this.#maxRequests,
        pollMicros: this.#pollMicros,
        backingFd: backing?.fd,
        uring: uringAccess !== null && uringWhyNot === null,
      });
      mountFuse(point.path, {
        fd: device.fd,
        readOnly: this.readOnly,
        maxRead: MAX_IO,
        source: `tapd:${this.target.name}`,
      });
    } catch (e) {
      device?.[Symbol.dispose]();
      backing?.close();
      this.#returnPassthrough();
      uringAccess?.[Symbol.dispose]();
      throw e;
    }
    this.#mountPoint = point.path;
    this.#session = session;
    // Reading mountinfo does not touch the new file system, so it is safe before INIT.
    this.#mount = findMount(point.path);
    if (!setIoFlusher()) this.#log.debug("PR_SET_IO_FLUSHER not available");
    let access: DirectAccess | null = null;
    this.#running = session.run().catch((e) => {
      this.#log.error("FUSE session failed", { error: (e as Error).message });
    }).finally(async () => {
      this.#threads?.[Symbol.dispose]();
      // The ring threads end once the kernel has ended their entries (at once, when the
      // connection goes); their memory and the descriptor are freed only then.
      if (this.#uring !== null) {
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          this.#uring.ended,
          new Promise((resolve) => timer = setTimeout(resolve, URING_STOP_MS)),
        ]);
        clearTimeout(timer);
      }
      this.#uring?.[Symbol.dispose]();
      access?.[Symbol.dispose]();
      session[Symbol.dispose]();
      device[Symbol.dispose]();
      backing?.close();
      this.#log.info("unmounted", { requests: session.requests });
      this.#endedFlag = true;
      this.#ended.resolve();
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`FUSE mount "${this.path}": no INIT from the kernel`)),
        INIT_TIMEOUT_MS,
      );
    });
    try {
      await Promise.race([session.initialized, timeout]);
    } catch (e) {
      this.#abort();
      await this.#running;
      uringAccess?.[Symbol.dispose]();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    if (session.uring) {
      access = uringAccess;
      uringAccess = null;
      let uring: FuseUring | null = null;
      try {
        uring = new FuseUring({
          fuseFd: device.fd,
          access: access!,
          readOnly: this.readOnly,
          log: this.#log,
          onRequest: (bytes, on) => void session.serveHanded(bytes, on),
          onLost: (error) => this.#lose(`a FUSE io_uring thread failed: ${error}`),
        });
        await uring.ready;
        this.#uring = uring;
      } catch (e) {
        // The kernel waits for the ring: end the connection rather than leave it hanging.
        this.#uring = uring;
        this.#abort();
        await this.#running;
        throw new Error(
          `FUSE mount "${this.path}": FUSE over io_uring was agreed but its ring could not be ` +
            `set up (${(e as Error).message}); mount without it`,
        );
      }
    } else if (this.#wantUring) {
      uringAccess?.[Symbol.dispose]();
      this.#log.warn("no FUSE over io_uring: /dev/fuse carries the requests", {
        reason: uringWhyNot ?? "the kernel did not offer it at INIT",
      });
    }
    if (this.#ioThreads > 0 && !session.passthrough && this.#uring === null) {
      access = this.target.directAccess?.() ?? null;
      if (access !== null) {
        try {
          this.#threads = new IoThreads({
            count: this.#ioThreads,
            device,
            access,
            readOnly: this.readOnly,
            log: this.#log,
            onRequest: (bytes, on) => void session.serveHanded(bytes, on),
            onLost: (error) => this.#lose(`a FUSE I/O thread failed: ${error}`),
          });
          session.handOff(this.#threads.ended);
        } catch (e) {
          access[Symbol.dispose]();
          access = null;
          this.#log.warn("no FUSE I/O threads: the event loop serves reads and writes", {
            error: (e as Error).message,
          });
        }
      }
    }
    if (session.passthroughRefused !== null) {
      this.#returnPassthrough();
      this.#log.warn("FUSE passthrough is off: tapd serves reads and writes itself", {
        reason: session.passthroughRefused,
      });
    }
    this.#log.info("mounted", {
      disk: this.target.name,
      size: this.target.size,
      readOnly: this.readOnly,
      ...(this.#passthrough ? { passthrough: session.passthrough } : {}),
      ...(this.#threads !== null ? { ioThreads: this.#ioThreads } : {}),
      ...(this.#wantUring ? { uring: this.#uring !== null } : {}),
    });
  }

  /**
   * A second descriptor of the raw image for the kernel's passthrough I/O, without the disk's
   * O_DIRECT: a direct opener of the export (a loop device) still gets direct I/O, and a buffered
   * one (dd, cp, an mmap) gets the image's page cache instead of EINVAL on unaligned requests.
   */
  #openBacking(): FileHandle {
    const file = this.target.passthroughFile?.() ?? null;
    if (file === null) {
      throw new Error(
        `FUSE passthrough needs a raw disk (tap:aio or tap:sync on a file or device whose size ` +
          `is a whole number of sectors); "${this.target.name}" is mapped by tapd`,
      );
    }
    try {
      return FileHandle.open(`/proc/self/fd/${file.fd}`, this.readOnly ? O_RDONLY : O_RDWR);
    } catch (e) {
      this.target.passthroughReturned?.();
      throw e;
    }
  }

  /** True from mount() until the connection ends. */
  get mounted(): boolean {
    return this.#running !== null && !this.#endedFlag;
  }

  /**
   * Resolves when the connection has ended, by close() or otherwise (someone unmounted the
   * file, or aborted the connection), and every request started has been answered.
   */
  get ended(): Promise<void> {
    return this.#ended.promise;
  }

  /** Requests served so far. */
  get requests(): number {
    return this.#session?.requests ?? 0;
  }

  /**
   * Unmounts and waits until every request in flight has been answered. While the file is in
   * use (a loop device on it, an open descriptor) unmounting is retried for `graceMs`; then it
   * throws a MountError (EBUSY) and the export goes on serving, unless `force` is set, which
   * aborts the connection. Idempotent once it has succeeded.
   */
  close(options: FuseCloseOptions = {}): Promise<void> {
    if (this.#running === null) return Promise.resolve();
    if (this.#closing !== null) {
      // A close still waiting for users to let go: `force` ends the wait now.
      if (options.force && !this.#endedFlag) this.#abort();
      return this.#closing;
    }
    const closing = this.#unmount(options).then(() => this.#running!).then(() => {
      // The kernel's passthrough I/O bypasses the connection: after an abort or a lazy unmount
      // a user that still has the file open (a loop device) may go on writing through it, so
      // the file counts as returned only once nobody can have it open.
      if (this.#unmountedClean) this.#returnPassthrough();
    });
    this.#closing = closing;
    closing.catch(() => {
      if (this.#closing === closing) this.#closing = null; // still mounted: may be retried
    });
    return closing;
  }

  async #unmount({ graceMs = 5000, force = false }: FuseCloseOptions): Promise<void> {
    const path = this.#mountPoint!;
    const deadline = Date.now() + graceMs;
    for (;;) {
      if (this.#endedFlag) return;
      try {
        await unmount(path);
        this.#unmountedClean = true;
        return;
      } catch (e) {
        const detached = e instanceof SysError && e.errno === EINVAL; // unmounted elsewhere
        if (!detached && !(e instanceof MountError)) throw e;
        if (Date.now() >= deadline) {
          if (force) {
            this.#log.warn("still in use: aborting the connection", { error: String(e) });
            this.#abort();
            return;
          }
          throw detached
            ? new MountError(
              16,
              `Cannot close the FUSE export "${this.path}": it was unmounted lazily and is ` +
                `still in use (an attached loop device or an open descriptor)`,
            )
            : e;
        }
        await sleep(100);
      }
    }
  }

  /** The disk's front may read ahead again as far as this export is concerned. */
  #returnPassthrough(): void {
    if (this.#passthroughLent) this.target.passthroughReturned?.();
    this.#passthroughLent = false;
  }

  /**
   * Requests were read and will never be answered: ends the connection, so that whoever waits
   * for them gets an error instead of waiting for ever (a loop device, processes in D state).
   */
  #lose(failure: string): void {
    if (this.#failure !== null || this.#endedFlag) return;
    this.#failure = failure;
    this.#log.error("requests were lost: aborting the FUSE connection", { error: failure });
    this.#abort();
  }

  /** Aborts this export's connection (requests waiting on it fail) and unmounts lazily. */
  #abort(): void {
    if (this.#mount !== null) {
      try {
        abortConnection(this.#mount);
      } catch (e) {
        this.#log.warn("could not abort the FUSE connection", { error: String(e) });
      }
    }
    try {
      unmountLazily(this.#mountPoint!);
    } catch { /* already unmounted */ }
  }
}
