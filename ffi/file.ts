/** File descriptors as handles that close themselves, with the libc calls made on them. */
import { check, lastErrno, pooled, SysError } from "./errno.ts";
import { cString, libc } from "./libc.ts";
import {
  BLKDISCARD,
  BLKGETSIZE64,
  BLKPBSZGET,
  BLKSSZGET,
  EFD_CLOEXEC,
  EINTR,
  EPOLL_CLOEXEC,
  EPOLL_CTL_ADD,
  F_OFD_GETLK,
  F_OFD_SETLK,
  F_UNLCK,
  F_WRLCK,
  FLOCK_SIZE,
  MFD_CLOEXEC,
  O_CLOEXEC,
  S_IFBLK,
  S_IFMT,
  S_IFREG,
} from "./constants.ts";

/** What fstat says about a descriptor (the fields tapd uses). */
export interface FileStat {
  /** "st_dev:st_ino": the same for every name and descriptor of one file. */
  identity: string;
  mode: number;
  size: number;
  blockSize: number;
  /** Bytes actually allocated on disk (st_blocks × 512). */
  allocated: number;
  isRegular: boolean;
  isBlockDevice: boolean;
}

/** An open file descriptor. `close()` and dispose are idempotent. */
export class FileHandle implements Disposable {
  #fd: number;
  /** The path it was opened with (for error messages). */
  readonly path: string;
  /** What to release once the descriptor is closed (afterClose). */
  #released: (() => void)[] = [];

  constructor(fd: number, path: string) {
    this.#fd = fd;
    this.path = path;
  }

  /** open(2) with O_CLOEXEC added; throws a SysError naming the path. */
  static open(path: string, flags: number, mode = 0o644): FileHandle {
    const fd = check(libc.open(cString(path), flags | O_CLOEXEC, mode), "open", path);
    return new FileHandle(fd, path);
  }

  /** A second descriptor of the same open file (dup(2): same offset, flags and O_DIRECT). */
  duplicate(): FileHandle {
    return new FileHandle(check(libc.dup(this.fd), "dup", this.path), this.path);
  }

  /** The raw descriptor; throws once closed. */
  get fd(): number {
    if (this.#fd < 0) throw new Error(`File "${this.path}" is closed`);
    return this.#fd;
  }

  get closed(): boolean {
    return this.#fd < 0;
  }

  stat(): FileStat {
    const buf = new Uint8Array(144);
    check(libc.fstat(this.fd, buf), "fstat", this.path);
    const v = new DataView(buf.buffer);
    const mode = v.getUint32(24, true);
    return {
      identity: `${v.getBigUint64(0, true)}:${v.getBigUint64(8, true)}`,
      mode,
      size: Number(v.getBigInt64(48, true)),
      blockSize: Number(v.getBigInt64(56, true)),
      allocated: Number(v.getBigInt64(64, true)) * 512,
      isRegular: (mode & S_IFMT) === S_IFREG,
      isBlockDevice: (mode & S_IFMT) === S_IFBLK,
    };
  }

  /** Size in bytes of a block device (BLKGETSIZE64). */
  blockDeviceSize(): number {
    const out = new BigUint64Array(1);
    check(libc.ioctl(this.fd, BLKGETSIZE64, out), "ioctl(BLKGETSIZE64)", this.path);
    return Number(out[0]);
  }

  /** Logical and physical sector sizes of a block device (BLKSSZGET, BLKPBSZGET). */
  blockDeviceSectors(): { logical: number; physical: number } {
    const out = new Int32Array(1);
    check(libc.ioctl(this.fd, BLKSSZGET, out), "ioctl(BLKSSZGET)", this.path);
    const logical = out[0];
    check(libc.ioctl(this.fd, BLKPBSZGET, out), "ioctl(BLKPBSZGET)", this.path);
    return { logical, physical: out[0] };
  }

  /** Discards a byte range of a block device (BLKDISCARD), off the event loop. */
  async blockDiscard(offset: number, length: number): Promise<void> {
    const range = new BigUint64Array([BigInt(offset), BigInt(length)]);
    const fd = this.fd;
    await pooled(
      "ioctl(BLKDISCARD)",
      this.path,
      () => libc.ioctl_nb(fd, BLKDISCARD, range),
      () => libc.ioctl(fd, BLKDISCARD, range),
    );
  }

  /** fallocate(2) off the event loop. */
  async fallocate(mode: number, offset: number, length: number): Promise<void> {
    const fd = this.fd, off = BigInt(offset), len = BigInt(length);
    await pooled(
      "fallocate",
      this.path,
      () => libc.fallocate_nb(fd, mode, off, len),
      () => libc.fallocate(fd, mode, off, len),
    );
  }

  /** lseek(2) off the event loop; SEEK_DATA/SEEK_HOLE past the last data give ENXIO. */
  async seek(offset: number, whence: number): Promise<number> {
    const fd = this.fd, off = BigInt(offset);
    return Number(
      await pooled(
        "lseek",
        this.path,
        () => libc.lseek_nb(fd, off, whence),
        () => libc.lseek(fd, off, whence),
      ),
    );
  }

  /** A small synchronous pread (headers at open time); returns the bytes read. */
  readAt(buf: Uint8Array, offset: number): number {
    return Number(
      check(libc.pread(this.fd, buf, BigInt(buf.length), BigInt(offset)), "pread", this.path),
    );
  }

  /** A small synchronous pwrite (image creation, headers); returns the bytes written. */
  writeAt(buf: Uint8Array, offset: number): number {
    return Number(
      check(libc.pwrite(this.fd, buf, BigInt(buf.length), BigInt(offset)), "pwrite", this.path),
    );
  }

  /** fsync(2), synchronously (small files at creation time). */
  syncNow(): void {
    check(libc.fsync(this.fd), "fsync", this.path);
  }

  truncate(size: number): void {
    check(libc.ftruncate(this.fd, BigInt(size)), "ftruncate", this.path);
  }

  /**
   * Sets (`type` F_RDLCK or F_WRLCK) or removes (F_UNLCK) an open file description lock on one
   * byte; never waits. Returns the errno when the lock is refused (EAGAIN: another description
   * holds a conflicting one; ENOLCK, EINVAL, EOPNOTSUPP: the file system has no such locks).
   */
  byteLock(offset: number, type: number): number {
    const flock = byteLockStruct(offset, type);
    return libc.fcntl_lock(this.fd, F_OFD_SETLK, flock) === 0 ? 0 : lastErrno();
  }

  /** Whether another open file description holds a lock on the byte at `offset` (F_OFD_GETLK). */
  byteLocked(offset: number): boolean {
    const flock = byteLockStruct(offset, F_WRLCK);
    check(libc.fcntl_lock(this.fd, F_OFD_GETLK, flock), "fcntl(F_OFD_GETLK)", this.path);
    return new DataView(flock.buffer).getInt16(0, true) !== F_UNLCK;
  }

  /** Runs `release` once the descriptor has been closed (something held on its behalf). */
  afterClose(release: () => void): void {
    if (this.#fd < 0) throw new Error(`File "${this.path}" is closed`);
    this.#released.push(release);
  }

  close(): void {
    if (this.#fd < 0) return;
    const fd = this.#fd;
    this.#fd = -1;
    try {
      check(libc.close(fd), "close", this.path);
    } finally {
      for (const release of this.#released.splice(0)) release();
    }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function byteLockStruct(offset: number, type: number): Uint8Array<ArrayBuffer> {
  const flock = new Uint8Array(FLOCK_SIZE); // l_whence SEEK_SET, l_pid 0 (required for OFD locks)
  const view = new DataView(flock.buffer);
  view.setInt16(0, type, true);
  view.setBigInt64(8, BigInt(offset), true);
  view.setBigInt64(16, 1n, true);
  return flock;
}

/** A counter file descriptor (eventfd(2)) used to wake a waiter parked on the thread pool. */
export class EventFd implements Disposable {
  readonly handle: FileHandle;
  #scratch = new BigUint64Array(1);
  #one = new BigUint64Array([1n]);

  constructor(handle?: FileHandle) {
    this.handle = handle ??
      new FileHandle(check(libc.eventfd(0, EFD_CLOEXEC), "eventfd"), "eventfd");
  }

  /** Wraps an eventfd received from elsewhere (another process, over a socket). */
  static adopt(handle: FileHandle): EventFd {
    return new EventFd(handle);
  }

  get fd(): number {
    return this.handle.fd;
  }

  /** Waits, on a pool thread, until the counter is non-zero, then resets it; returns its value. */
  async wait(): Promise<bigint> {
    const rc = await libc.read_nb(this.fd, this.#scratch, 8n);
    if (rc !== 8n) throw new Error(`read(eventfd) returned ${rc}`);
    return this.#scratch[0];
  }

  /** Adds one to the counter, waking a parked `wait()`. */
  signal(): void {
    check(libc.write(this.fd, this.#one, 8n), "write(eventfd)");
  }

  [Symbol.dispose](): void {
    this.handle.close();
  }
}

const EPOLL_EVENT_SIZE = 12; // packed on x86-64: u32 events, u64 data

/**
 * An epoll instance whose waits block the calling thread: for Workers (fuse/io_thread.ts), never
 * the event loop. Events carry the descriptor they are for.
 */
export class Epoll implements Disposable {
  readonly handle = new FileHandle(
    check(libc.epoll_create1(EPOLL_CLOEXEC), "epoll_create1"),
    "epoll",
  );
  readonly #events: Uint8Array<ArrayBuffer>;
  readonly #view: DataView;

  constructor(maxEvents = 4) {
    this.#events = new Uint8Array(maxEvents * EPOLL_EVENT_SIZE);
    this.#view = new DataView(this.#events.buffer);
  }

  /** Watches `fd` for `events` (EPOLLIN, with EPOLLEXCLUSIVE to share a wake-up with others). */
  add(fd: number, events: number): void {
    const event = new DataView(new ArrayBuffer(EPOLL_EVENT_SIZE));
    event.setUint32(0, events >>> 0, true);
    event.setBigUint64(4, BigInt(fd), true);
    check(
      libc.epoll_ctl(this.handle.fd, EPOLL_CTL_ADD, fd, new Uint8Array(event.buffer)),
      "epoll_ctl",
    );
  }

  /** Blocks until an event (or a signal: then 0); returns how many, each read with `fdOf`. */
  wait(timeoutMs = -1): number {
    const n = libc.epoll_wait(
      this.handle.fd,
      this.#events,
      this.#events.length / EPOLL_EVENT_SIZE,
      timeoutMs,
    );
    if (n >= 0) return n;
    const errno = lastErrno();
    if (errno === EINTR) return 0;
    throw new SysError(errno, "epoll_wait");
  }

  /** The descriptor of the `i`th event of the last wait. */
  fdOf(i: number): number {
    return Number(this.#view.getBigUint64(i * EPOLL_EVENT_SIZE + 4, true));
  }

  [Symbol.dispose](): void {
    this.handle.close();
  }
}

/** An anonymous memory file (memfd_create(2)) of the given size. */
export function memfd(name: string, size: number): FileHandle {
  const fd = check(libc.memfd_create(cString(name), MFD_CLOEXEC), "memfd_create", name);
  const handle = new FileHandle(fd, `memfd:${name}`);
  handle.truncate(size);
  return handle;
}

/** Opens a POSIX shared-memory object (`/dev/shm/NAME`). */
export function shmOpen(name: string, flags: number, mode = 0o600): FileHandle {
  const fd = check(libc.shm_open(cString(name), flags | O_CLOEXEC, mode), "shm_open", name);
  return new FileHandle(fd, `shm:${name}`);
}

/** Removes a POSIX shared-memory object's name. */
export function shmUnlink(name: string): void {
  check(libc.shm_unlink(cString(name)), "shm_unlink", name);
}
