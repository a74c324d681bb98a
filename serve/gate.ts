/**
 * DiskGate: the front of a served disk, between its exports and the Disk. It counts requests
 * per operation (serve/stats.ts), can pause — new requests wait, those in flight finish, the
 * disk is flushed — and resume, optionally on another image of the same size (the snapshot
 * flow: pause, make an overlay whose backing file is the old image, resume on the overlay).
 */
import type { Disk } from "../drivers/disk.ts";
import type { FileHandle } from "../ffi/file.ts";
import type { DirectAccess } from "../drivers/direct_access.ts";
import type { DiskDone, DiskInfo, Extent } from "../drivers/driver.ts";
import { DiskError } from "../drivers/errors.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { type Buffers, byteLength } from "../io/engine.ts";
import { type Op, OPS, OpStats, type OpSummary, summarize } from "./stats.ts";
import { ReadAhead, type ReadAheadStats } from "./read_ahead.ts";

export interface GateStats {
  paused: boolean;
  inFlight: number;
  ops: Record<Op, OpSummary>;
  /** Sequential reads answered from memory read ahead; null when read-ahead is off. */
  readAhead: ReadAheadStats | null;
}

export class DiskGate implements BlockTarget {
  #disk: Disk;
  #inflight = 0;
  #idle: (() => void)[] = [];
  /** Resolves when the gate opens again; null while open. */
  #held: Promise<void> | null = null;
  #release: (() => void) | null = null;
  readonly #stats = new Map<Op, OpStats>(OPS.map((op) => [op, new OpStats()]));
  readonly #readStats = this.#stats.get("read")!;
  readonly #writeStats = this.#stats.get("write")!;
  /** Raw files lent to I/O threads: held, counted and closed with the gate. */
  readonly #lent: DirectAccess[] = [];
  /** Off for disks changed by writers that do not pass here (see #stopReadAhead). */
  #ahead: ReadAhead | null = null;
  readonly #wantReadAhead: boolean;
  /** Writers that bypass the gate: lent raw files not yet disposed, passthrough files. */
  #bypasses = 0;
  #closed = false;

  /** `readAhead` false: every read goes to the disk (read-ahead is on by default). */
  constructor(disk: Disk, options: { readAhead?: boolean } = {}) {
    this.#disk = disk;
    this.#wantReadAhead = options.readAhead !== false;
    this.#startReadAhead();
  }

  get disk(): Disk {
    return this.#disk;
  }

  get info(): DiskInfo {
    return this.#disk.info;
  }

  get size(): number {
    return this.#disk.size;
  }

  get name(): string {
    return this.#disk.name;
  }

  get paused(): boolean {
    return this.#held !== null;
  }

  /**
   * The disk's file for FUSE passthrough: reads and writes through it never pass the gate, so
   * they are neither counted nor held (the tapdisk refuses to pause such a disk).
   */
  passthroughFile(): FileHandle | null {
    const file = this.#disk.passthroughFile();
    if (file !== null) this.#bypassed();
    return file;
  }

  passthroughReturned(): void {
    this.#unbypassed();
  }

  /**
   * The disk's raw file for I/O threads: their requests are held by pause() and counted in
   * stats(). After a resume on another image they hand every request back (to this gate).
   */
  directAccess(): DirectAccess | null {
    const access = this.#disk.directAccess();
    if (access === null) return null;
    this.#bypassed();
    if (this.#held !== null) void access.hold();
    this.#lent.push(access);
    access.whenDisposed(() => {
      // Its counts stay in stats(); its fence no longer holds anything.
      this.#unbypassed();
    });
    return access;
  }

  read(offset: number, bufs: Buffers): Promise<void> {
    return this.#run("read", byteLength(bufs), (d) => {
      const ahead = this.#ahead;
      if (ahead === null) return d.read(offset, bufs);
      return new Promise((resolve, reject) => {
        ahead.read(offset, bufs, (e) => e === null ? resolve() : reject(e));
      });
    });
  }

  /**
   * Serves a read at once from memory read ahead, when that covers it: `use` gets the bytes as
   * views, in order, to be done with when it returns. False (nothing done) otherwise, or while
   * paused: then read or submit it.
   */
  readInPlace(offset: number, length: number, use: (parts: Uint8Array[]) => void): boolean {
    const ahead = this.#ahead;
    if (ahead === null || this.#held !== null || this.#closed) return false;
    const stats = this.#readStats, start = stats.start();
    let served: boolean;
    try {
      served = ahead.peek(offset, offset + length, use);
    } catch (e) {
      stats.end(start, length, true);
      throw e;
    }
    // Timed like any other read (the reply's write); a miss is not a request.
    if (served) stats.end(start, length, false);
    else stats.unstart();
    return served;
  }

  write(offset: number, bufs: Buffers): Promise<void> {
    return this.#run("write", byteLength(bufs), (d) => d.write(offset, bufs), offset);
  }

  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void {
    if (this.#held !== null) {
      this.#held.then(() => this.submit(write, offset, bufs, done));
      return;
    }
    const stats = write ? this.#writeStats : this.#readStats;
    const bytes = byteLength(bufs), start = stats.start();
    this.#inflight++;
    const finish = (e: Error | null): void => {
      stats.end(start, bytes, e !== null);
      this.#left();
      done(e);
    };
    if (!write) {
      const ahead = this.#ahead;
      if (ahead === null) this.#disk.submit(false, offset, bufs, finish);
      else ahead.read(offset, bufs, finish);
      return;
    }
    // At its end too, even if read-ahead was off at its start: it may have started meanwhile.
    this.#ahead?.changed(offset, offset + bytes);
    this.#disk.submit(true, offset, bufs, (e) => {
      this.#ahead?.changed(offset, offset + bytes);
      finish(e);
    });
  }

  flush(): Promise<void> {
    return this.#run("flush", 0, (d) => d.flush());
  }

  discard(offset: number, length: number): Promise<void> {
    return this.#run("discard", length, (d) => d.discard(offset, length), offset);
  }

  writeZeroes(offset: number, length: number, options: { mayUnmap?: boolean } = {}): Promise<void> {
    const zero = (d: Disk) => d.writeZeroes(offset, length, options);
    return this.#run("writeZeroes", length, zero, offset);
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#run("blockStatus", 0, (d) => d.blockStatus(offset, length));
  }

  /** Holds new requests, waits for those in flight, flushes. Idempotent. */
  async pause(): Promise<void> {
    if (this.#held === null) this.#held = new Promise((resolve) => this.#release = resolve);
    await Promise.all(this.#lent.map((access) => access.hold()));
    if (this.#inflight > 0) await new Promise<void>((resolve) => this.#idle.push(resolve));
    if (!this.#disk.info.readOnly) await this.#disk.flush();
  }

  /**
   * Opens the gate again; with `next`, first switches to that disk (which must have the same
   * size: clients already connected know the old one) and closes the old one. On error the
   * gate stays paused on the old disk and `next` is left to the caller.
   */
  async resume(next?: Disk): Promise<void> {
    if (next !== undefined) {
      if (this.#held === null) throw new DiskError("EINVAL", "resume: the disk is not paused");
      if (next.size !== this.#disk.size) {
        throw new DiskError(
          "EINVAL",
          `resume: ${next.name} has ${next.size} bytes, but clients know ${this.#disk.size}`,
        );
      }
      const old = this.#disk;
      this.#disk = next;
      if (next.changedElsewhere) this.#stopReadAhead();
      else {
        this.#ahead?.clear();
        this.#startReadAhead(); // the old disk may have been one without it (a RAM disk)
      }
      // The threads' file is the old image: from now on everything comes through here.
      await Promise.all(this.#lent.map((access) => access.close()));
      await old.close();
    }
    for (const access of this.#lent) access.open();
    const release = this.#release;
    this.#held = this.#release = null;
    release?.();
  }

  /**
   * Waits for requests in flight and closes the disk; held requests fail. Read-ahead stops only
   * then: reads waiting for a window that loads are answered from it.
   */
  async close(): Promise<void> {
    this.#closed = true;
    const disk = this.#disk;
    const release = this.#release;
    this.#held = this.#release = null;
    release?.();
    try {
      await Promise.all(this.#lent.map((access) => access.close()));
      await disk.close();
    } finally {
      this.#stopReadAhead();
    }
  }

  stats(): GateStats {
    const ops = {} as Record<Op, OpSummary>;
    for (const [op, s] of this.#stats) ops[op] = summarize(s);
    let inFlight = this.#inflight, read = this.#readStats, write = this.#writeStats;
    for (const access of this.#lent) {
      read = read.plus(access.stats(false));
      write = write.plus(access.stats(true));
      inFlight += access.inflight;
    }
    ops.read = summarize(read);
    ops.write = summarize(write);
    return { paused: this.paused, inFlight, ops, readAhead: this.#ahead?.stats() ?? null };
  }

  /** Writes will bypass the gate (I/O threads, passthrough): windows could go stale. */
  #bypassed(): void {
    this.#bypasses++;
    this.#stopReadAhead();
  }

  /** A bypass has ended: with none left, every write passes here again. */
  #unbypassed(): void {
    if (--this.#bypasses === 0) this.#startReadAhead();
  }

  /** Read-ahead, unless it was not asked for or a writer may change the disk behind the gate. */
  #startReadAhead(): void {
    if (
      this.#ahead !== null || !this.#wantReadAhead || this.#closed || this.#bypasses > 0 ||
      this.#disk.changedElsewhere
    ) return;
    this.#ahead = new ReadAhead(
      (offset, bufs, done) => this.#disk.submit(false, offset, bufs, done),
      (offset, buf, done) => {
        this.#inflight++;
        this.#disk.submit(false, offset, buf, (e) => {
          this.#left();
          done(e);
        });
      },
      this.#disk.size,
    );
  }

  #stopReadAhead(): void {
    this.#ahead?.clear();
    this.#ahead = null;
  }

  /**
   * Runs one request, held while paused and counted. A change (`changes`: where it starts, over
   * `bytes`) drops the windows read ahead over it when it starts and again when it ends.
   */
  async #run<T>(
    op: Op,
    bytes: number,
    call: (disk: Disk) => Promise<T>,
    changes?: number,
  ): Promise<T> {
    if (this.#held !== null) await this.#held;
    const stats = this.#stats.get(op)!;
    const start = stats.start();
    this.#inflight++;
    if (changes !== undefined) this.#ahead?.changed(changes, changes + bytes);
    let failed = true;
    try {
      const result = await call(this.#disk);
      failed = false;
      return result;
    } finally {
      if (changes !== undefined) this.#ahead?.changed(changes, changes + bytes);
      stats.end(start, bytes, failed);
      this.#left();
    }
  }

  #left(): void {
    if (--this.#inflight === 0 && this.#idle.length > 0) {
      const idle = this.#idle;
      this.#idle = [];
      for (const resolve of idle) resolve();
    }
  }
}
