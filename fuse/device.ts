/**
 * The /dev/fuse descriptor of one mount (protocols.md §17, §23). It is opened O_NONBLOCK: the
 * event loop drains every queued request with plain synchronous read(2)s (each returns exactly
 * one request; EAGAIN once the queue is empty), and only then parks a single poll(2) on Deno's
 * thread pool until more arrive. So one pool thread waits however many requests are in flight,
 * and everything the kernel queued during one turn is started in that turn (and reaches the I/O
 * engine as one batch). Replies are single synchronous write(2)s.
 */
import { lastErrno, SysError } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { addressOf } from "../ffi/memory.ts";
import { EAGAIN, EINTR, ENOENT, O_RDWR } from "../ffi/constants.ts";
import { BACKING_MAP_SIZE, FUSE_DEV_IOC_BACKING_OPEN, FUSE_DEV_IOC_CLONE } from "./protocol.ts";

const O_NONBLOCK = 0o4000;
const POLLIN = 0x1;
const ENODEV = 19;
const ECONNABORTED = 103;
const PR_SET_IO_FLUSHER = 57;

/** What a read of the device gave. */
export const READ_NONE = 0;
export const READ_GONE = -1;

/** Where a request's answer goes: a /dev/fuse descriptor, or a FUSE-over-io_uring entry. */
export interface ReplyChannel {
  /** Sends one reply; false when the kernel no longer waits for it. */
  write(reply: Uint8Array): boolean;
  /**
   * Optional: sends one reply gathered from `parts` (header first) without joining them; null,
   * with nothing sent, when it cannot (a part's address is unknown, or too many parts).
   */
  writeParts?(parts: readonly Uint8Array[]): boolean | null;
}

/** The most parts writeParts() gathers into one reply. */
const MAX_PARTS = 32;
const TWO32 = 2 ** 32;

export class FuseDevice implements Disposable, ReplyChannel {
  readonly handle: FileHandle;
  readonly #pollfd = new Int32Array(2);
  /** writeParts()'s struct iovec array, as u32 words: base low, base high, length, 0. */
  readonly #iov = new Uint32Array(4 * MAX_PARTS);

  constructor() {
    this.handle = FileHandle.open("/dev/fuse", O_RDWR | O_NONBLOCK);
    this.#pollfd[0] = this.handle.fd;
    this.#pollfd[1] = POLLIN; // short events = POLLIN, short revents = 0 (little-endian)
  }

  /**
   * A second (non-blocking) descriptor of this one's connection (FUSE_DEV_IOC_CLONE), for an I/O
   * thread: it takes requests off the same queue, and a request read on it is answered on it.
   */
  clone(): FuseDevice {
    const copy = new FuseDevice();
    if (libc.ioctl(copy.fd, BigInt(FUSE_DEV_IOC_CLONE), new Uint32Array([this.fd])) < 0) {
      const errno = lastErrno();
      copy[Symbol.dispose]();
      throw new SysError(errno, "ioctl(FUSE_DEV_IOC_CLONE)", "/dev/fuse");
    }
    return copy;
  }

  get fd(): number {
    return this.handle.fd;
  }

  /**
   * Reads one request into `buf` (sized for the largest request). Returns its length,
   * READ_NONE when no request is queued, READ_GONE once the file system is unmounted or the
   * connection aborted.
   */
  read(buf: Uint8Array): number {
    for (;;) {
      const n = Number(libc.read(this.handle.fd, buf, BigInt(buf.length)));
      if (n >= 0) return n;
      const errno = lastErrno();
      // EINTR: a signal; ENOENT: the request vanished (interrupted) before it was copied.
      if (errno === EINTR || errno === ENOENT) continue;
      if (errno === EAGAIN) return READ_NONE;
      if (errno === ENODEV || errno === ECONNABORTED) return READ_GONE;
      throw new SysError(errno, "read", "/dev/fuse");
    }
  }

  /** Resolves when a request is queued or the connection is gone (poll on a pool thread). */
  async readable(): Promise<void> {
    this.#pollfd[1] = POLLIN;
    await libc.poll_nb(this.#pollfd, 1n, -1);
  }

  /**
   * Sends one reply. False when the kernel no longer waits for it (the request was interrupted
   * or the connection ended: ENOENT, ENODEV), which is normal; other failures are bugs in the
   * reply and throw.
   */
  write(reply: Uint8Array): boolean {
    const n = Number(libc.write(this.handle.fd, reply, BigInt(reply.length)));
    return this.#written(n, reply.length);
  }

  writeParts(parts: readonly Uint8Array[]): boolean | null {
    if (parts.length > MAX_PARTS) return null;
    const w = this.#iov;
    let total = 0;
    for (let i = 0; i < parts.length; i++) {
      const address = addressOf(parts[i]);
      if (address === null) return null;
      w[4 * i] = address % TWO32;
      w[4 * i + 1] = Math.floor(address / TWO32);
      w[4 * i + 2] = parts[i].length;
      w[4 * i + 3] = 0;
      total += parts[i].length;
    }
    return this.#written(Number(libc.writev(this.handle.fd, w, parts.length)), total);
  }

  #written(n: number, length: number): boolean {
    if (n === length) return true;
    if (n >= 0) throw new Error(`write /dev/fuse: short write (${n} of ${length} bytes)`);
    const errno = lastErrno();
    if (errno === ENOENT || errno === ENODEV || errno === ECONNABORTED) return false;
    throw new SysError(errno, "write", "/dev/fuse");
  }

  /**
   * Registers `fd` as a backing file for passthrough opens (FUSE_DEV_IOC_BACKING_OPEN); returns
   * its id. Only after INIT has negotiated passthrough; the connection drops it when it ends.
   */
  openBacking(fd: number): number {
    const map = new Int32Array(BACKING_MAP_SIZE / 4);
    map[0] = fd;
    const id = libc.ioctl(this.handle.fd, BigInt(FUSE_DEV_IOC_BACKING_OPEN), map);
    if (id < 0) throw new SysError(lastErrno(), "ioctl(FUSE_DEV_IOC_BACKING_OPEN)", "/dev/fuse");
    return id;
  }

  [Symbol.dispose](): void {
    this.handle.close();
  }
}

/**
 * Marks the calling thread as one that block I/O depends on (PR_SET_IO_FLUSHER): with a loop
 * device over the export, memory reclaim may wait for tapd, so tapd's own allocations must not
 * wait for reclaim through I/O. Best effort (needs CAP_SYS_RESOURCE, Linux 5.6); true if set.
 */
export function setIoFlusher(): boolean {
  return libc.prctl(PR_SET_IO_FLUSHER, 1n, 0n, 0n, 0n) === 0;
}
