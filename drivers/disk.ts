/**
 * Disk: the checked front of a driver. Every request is validated here once (alignment, range,
 * read-only, closed), so drivers only implement the happy path. Exports (NBD, the ring, FUSE)
 * and tools all talk to a Disk.
 */
import type { FileHandle } from "../ffi/file.ts";
import { DirectAccess } from "./direct_access.ts";
import { type Buffers, byteLength } from "../io/engine.ts";
import type { DiskDone, DiskImpl, DiskInfo, Extent } from "./driver.ts";
import { DiskError } from "./errors.ts";

export class Disk implements AsyncDisposable {
  readonly info: DiskInfo;
  /** The spec it was opened from, for messages. */
  readonly name: string;
  readonly #impl: DiskImpl;
  #closed: Promise<void> | null = null;
  #inflight = 0;
  #idle: (() => void) | null = null;

  constructor(impl: DiskImpl, name: string) {
    this.#impl = impl;
    this.info = impl.info;
    this.name = name;
  }

  get size(): number {
    return this.info.size;
  }

  read(offset: number, bufs: Buffers): Promise<void> {
    return this.#check("read", offset, byteLength(bufs), false) ??
      this.#track(this.#impl.read(offset, bufs));
  }

  write(offset: number, bufs: Buffers): Promise<void> {
    return this.#check("write", offset, byteLength(bufs), true) ??
      this.#track(this.#impl.write(offset, bufs));
  }

  /** read/write in callback form (DiskImpl.submit), with the same checks. */
  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void {
    const error = this.#invalid(write ? "write" : "read", offset, byteLength(bufs), write);
    if (error !== null) {
      queueMicrotask(() => done(error));
      return;
    }
    this.#inflight++;
    const finish = (e: Error | null): void => {
      this.#settled();
      done(e);
    };
    const impl = this.#impl;
    if (impl.submit !== undefined) impl.submit(write, offset, bufs, finish);
    else {
      (write ? impl.write(offset, bufs) : impl.read(offset, bufs)).then(() => finish(null), finish);
    }
  }

  flush(): Promise<void> {
    return this.#closedError("flush") ?? this.#track(this.#impl.flush());
  }

  discard(offset: number, length: number): Promise<void> {
    return this.#check("discard", offset, length, true) ??
      this.#track(this.#impl.discard(offset, length));
  }

  writeZeroes(offset: number, length: number, options: { mayUnmap?: boolean } = {}): Promise<void> {
    return this.#check("write zeroes", offset, length, true) ??
      this.#track(this.#impl.writeZeroes(offset, length, options.mayUnmap ?? false));
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#check("block status", offset, length, false) ??
      this.#track(this.#impl.blockStatus(offset, length));
  }

  /** Other processes change the data without passing here (a shared RAM disk): no caching. */
  get changedElsewhere(): boolean {
    return this.#impl.changedElsewhere === true;
  }

  /** The file holding the disk byte for byte, if its driver has one (DiskImpl.passthroughFile). */
  passthroughFile(): FileHandle | null {
    return this.#impl.passthroughFile?.() ?? null;
  }

  /** The raw file lent to I/O threads (BlockTarget.directAccess); null for a mapped disk. */
  directAccess(): DirectAccess | null {
    const file = this.passthroughFile();
    return file === null ? null : new DirectAccess(file, this.size, this.info.logicalSectorSize);
  }

  /** Refuses new requests, waits for those in flight, and closes the driver. Idempotent. */
  close(): Promise<void> {
    this.#closed ??=
      (this.#inflight === 0
        ? Promise.resolve()
        : new Promise<void>((resolve) => this.#idle = resolve)).then(() => this.#impl.close());
    return this.#closed;
  }

  /** Counts a request until it settles, so that close() can wait for it. */
  #track<T>(p: Promise<T>): Promise<T> {
    this.#inflight++;
    return p.finally(this.#settled);
  }

  #settled = (): void => {
    if (--this.#inflight === 0 && this.#idle !== null) this.#idle();
  };

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  #closedError(what: string): Promise<never> | null {
    if (this.#closed === null) return null;
    return Promise.reject(this.#closedDiskError(what));
  }

  #closedDiskError(what: string): DiskError {
    return new DiskError("EIO", `${what}: disk ${this.name} is closed`);
  }

  /** A rejected promise when the request is invalid, null when it may go to the driver. */
  #check(what: string, offset: number, length: number, writes: boolean): Promise<never> | null {
    const error = this.#invalid(what, offset, length, writes);
    return error === null ? null : Promise.reject(error);
  }

  /** Why a request may not go to the driver, or null. */
  #invalid(what: string, offset: number, length: number, writes: boolean): DiskError | null {
    if (this.#closed !== null) return this.#closedDiskError(what);
    const sector = this.info.logicalSectorSize, size = this.info.size;
    let error: DiskError | null = null;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % sector !== 0) {
      error = new DiskError("EINVAL", `${what}: offset ${offset} is not a multiple of ${sector}`);
    } else if (!Number.isSafeInteger(length) || length <= 0 || length % sector !== 0) {
      error = new DiskError(
        "EINVAL",
        `${what}: length ${length} is not a positive multiple of ${sector}`,
      );
    } else if (offset + length > size) {
      error = new DiskError(
        writes ? "ENOSPC" : "EINVAL",
        `${what}: ${length} bytes at offset ${offset} go past the end of the disk (${size} bytes)`,
      );
    } else if (writes && this.info.readOnly) {
      error = new DiskError("EROFS", `${what}: disk ${this.name} is read-only`);
    }
    return error;
  }
}
