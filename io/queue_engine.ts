/**
 * What the two kernel-queue engines (libaio, io_uring) share: a fixed table of request slots,
 * a queue for requests beyond the depth, batching of the requests prepared in one event-loop turn
 * into few submissions, bounce buffers for memory the kernel cannot address, and the completion
 * wait: completions signal an eventfd, and one nonblocking read of it is parked on Deno's thread
 * pool only while requests are in flight and none are ready (the event loop never blocks).
 */
import { setImmediate } from "node:timers";
import { SysError } from "../ffi/errno.ts";
import { EventFd, type FileHandle } from "../ffi/file.ts";
import { addressOf, AlignedMemory } from "../ffi/memory.ts";
import { type BufferPool, sharedPool } from "./buffer_pool.ts";
import { PollWindow } from "./poll_window.ts";
import {
  type Buffers,
  byteLength,
  type EngineKind,
  type EngineOptions,
  type IoDone,
  type IoEngine,
} from "./engine.ts";

export const OP_READ = 0;
export const OP_WRITE = 1;
export const OP_FSYNC = 2;
export const OP_FDSYNC = 3;
export const OP_FALLOCATE = 4;
const OP_NAMES = ["read", "write", "fsync", "fdatasync", "fallocate"];

/**
 * A read or write of at least this many bytes goes to the kernel at once, with whatever was
 * prepared before it, instead of waiting for its batch to fill or the turn to end. Large
 * requests submitted together are merged by the block layer when their buffers allow it (huge
 * pages do): a sequential reader's 850 KiB read-ahead requests reached the disk as 2.5 MiB reads,
 * and each then waited for the others' data (bonnie++ block in through the FUSE export
 * 1.6 → 1.9 GB/s with this). One system call per large request costs nothing next to its data.
 */
export const SUBMIT_AT_ONCE = 128 * 1024;

/** Segments per request passed to the kernel as an iovec; longer lists are bounced. */
export const MAX_IOV = 64;
const IOVEC_SIZE = 16;

interface Waiting {
  op: number;
  file: FileHandle;
  offset: number;
  bufs: Buffers;
  arg: number; // fallocate: mode
  length: number; // fallocate: length
  resolve: (n: number) => void;
  reject: (e: Error) => void;
}

/** How an engine puts one request into its submission structure. */
export interface Prepared {
  op: number;
  fd: number;
  offset: number;
  /** Buffer or iovec array address; for fallocate, the length. */
  addr: number;
  /** Byte count, iovec count, or fallocate mode. */
  len: number;
  /** True when addr/len describe an iovec array. */
  vector: boolean;
}

export abstract class QueueEngine implements IoEngine {
  abstract readonly kind: EngineKind;
  protected readonly depth: number;
  protected readonly eventfd: EventFd = new EventFd();
  readonly #pool: BufferPool;
  readonly #iov: AlignedMemory;
  readonly #iovWords: Uint32Array;
  readonly #freeSlots: Int32Array;
  #freeTop: number;
  readonly #resolve: Array<((n: number) => void) | undefined>;
  readonly #reject: Array<((e: Error) => void) | undefined>;
  readonly #files: Array<FileHandle | undefined>;
  readonly #ops: Uint8Array;
  readonly #bounce: Array<Uint8Array<ArrayBuffer> | undefined>;
  readonly #bounceTargets: Array<Buffers | undefined>;
  readonly #prep: Prepared = { op: 0, fd: 0, offset: 0, addr: 0, len: 0, vector: false };
  #waiting: Waiting[] = [];
  #inflight = 0;
  readonly #poll: PollWindow | null;
  readonly #batch: number;
  readonly #coalesceAbove: number;
  #pooled = 0; // requests running on the thread pool instead of the kernel queue
  #prepared = 0;
  #flushScheduled = false;
  /** A full batch is being flushed from within submit(). */
  #submitting = false;
  #drainScheduled = false;
  /** A look for completions is scheduled, or an eventfd read is parked. */
  #active = false;
  #parked: Promise<void> | null = null;
  /** Completions handed out in the current run of microtask hops. */
  #run = 0;
  #destroyed = false;
  #idle: (() => void) | null = null;
  #closed: Promise<void> | null = null;

  constructor(options: EngineOptions) {
    this.depth = options.depth ?? 256;
    const pollMicros = options.pollMicros ?? DEFAULT_POLL_MICROS;
    this.#poll = pollMicros > 0 ? new PollWindow(pollMicros) : null;
    this.#batch = options.batch ?? DEFAULT_BATCH;
    this.#coalesceAbove = options.coalesceAbove ?? 0;
    this.#pool = sharedPool;
    this.#iov = new AlignedMemory(this.depth * MAX_IOV * IOVEC_SIZE);
    this.#iovWords = new Uint32Array(this.#iov.bytes.buffer);
    this.#freeSlots = new Int32Array(this.depth);
    for (let i = 0; i < this.depth; i++) this.#freeSlots[i] = this.depth - 1 - i;
    this.#freeTop = this.depth;
    this.#resolve = new Array(this.depth);
    this.#reject = new Array(this.depth);
    this.#files = new Array(this.depth);
    this.#ops = new Uint8Array(this.depth);
    this.#bounce = new Array(this.depth);
    this.#bounceTargets = new Array(this.depth);
  }

  /** Writes one request into the submission structure for `slot`. */
  protected abstract prepare(slot: number, p: Prepared): void;
  /** Submits the `count` requests prepared since the last call; returns how many went. */
  protected abstract submitPrepared(count: number): number;
  /** Reaps one ready completion, calling `complete()` for it; false when none is ready. */
  protected abstract reapOne(): boolean;
  /** Withdraws the prepared requests the kernel has not taken; returns their slots. */
  protected abstract takeUnsubmitted(): number[];
  /** Frees the kernel context once nothing is in flight. */
  protected abstract destroy(): void;
  /** Whether the kernel queue can fallocate (io_uring); otherwise it runs on the thread pool. */
  protected abstract readonly queuesFallocate: boolean;

  read(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
    return this.#enqueue(OP_READ, file, offset, bufs, 0, 0);
  }

  write(file: FileHandle, offset: number, bufs: Buffers): Promise<number> {
    return this.#enqueue(OP_WRITE, file, offset, bufs, 0, 0);
  }

  submit(write: boolean, file: FileHandle, offset: number, bufs: Buffers, done: IoDone): void {
    if (this.#closed !== null) {
      const error = new Error(`The ${this.kind} engine is closed`);
      queueMicrotask(() => done(error));
      return;
    }
    // `done` takes both outcomes, so it stands in for resolve and reject.
    const op = write ? OP_WRITE : OP_READ;
    if (this.#freeTop === 0) {
      this.#waiting.push({
        op,
        file,
        offset,
        bufs,
        arg: 0,
        length: 0,
        resolve: done,
        reject: done,
      });
    } else {
      this.#start(op, file, offset, bufs, 0, 0, done, done);
    }
  }

  async fsync(file: FileHandle, dataOnly: boolean): Promise<void> {
    await this.#enqueue(dataOnly ? OP_FDSYNC : OP_FSYNC, file, 0, EMPTY, 0, 0);
  }

  async fallocate(file: FileHandle, mode: number, offset: number, length: number): Promise<void> {
    if (this.queuesFallocate) {
      await this.#enqueue(OP_FALLOCATE, file, offset, EMPTY, mode, length);
      return;
    }
    // On the thread pool, but counted like a queued request so that close() waits for it.
    if (this.#closed !== null) throw new Error(`The ${this.kind} engine is closed`);
    this.#pooled++;
    try {
      await file.fallocate(mode, offset, length);
    } finally {
      this.#pooled--;
      this.#checkIdle();
    }
  }

  #enqueue(
    op: number,
    file: FileHandle,
    offset: number,
    bufs: Buffers,
    arg: number,
    length: number,
  ): Promise<number> {
    if (this.#closed !== null) {
      return Promise.reject(new Error(`The ${this.kind} engine is closed`));
    }
    return new Promise((resolve, reject) => {
      if (this.#freeTop === 0) {
        this.#waiting.push({ op, file, offset, bufs, arg, length, resolve, reject });
      } else {
        this.#start(op, file, offset, bufs, arg, length, resolve, reject);
      }
    });
  }

  #start(
    op: number,
    file: FileHandle,
    offset: number,
    bufs: Buffers,
    arg: number,
    length: number,
    resolve: (n: number) => void,
    reject: (e: Error) => void,
  ): void {
    let fd: number;
    try {
      fd = file.fd;
    } catch (e) {
      queueMicrotask(() => reject(e as Error)); // never from within submit()
      return;
    }
    const slot = this.#freeSlots[--this.#freeTop];
    const p = this.#prep;
    p.op = op;
    p.fd = fd;
    p.offset = offset;
    p.vector = false;
    if (op === OP_READ || op === OP_WRITE) {
      this.#describe(slot, op, bufs);
    } else if (op === OP_FALLOCATE) {
      p.addr = length;
      p.len = arg;
    } else {
      p.addr = 0;
      p.len = 0;
    }
    this.#resolve[slot] = resolve;
    this.#reject[slot] = reject;
    this.#files[slot] = file;
    this.#ops[slot] = op;
    this.prepare(slot, p);
    this.#inflight++;
    this.#prepared++;
    if (
      this.#prepared >= this.#batch ||
      (op <= OP_WRITE && (p.vector ? byteLength(bufs) : p.len) >= SUBMIT_AT_ONCE)
    ) {
      // A full batch goes to the kernel now rather than at the end of the caller's turn: a
      // server starting a burst of requests gets the first ones to the device while it prepares
      // the rest (under the ring's bursts of 64, the disk's latency fell from 0.47 to 0.33 ms).
      this.#submitting = true;
      try {
        this.#flush();
      } finally {
        this.#submitting = false;
      }
      return;
    }
    if (!this.#flushScheduled) {
      // Coalescing: with enough already at the kernel, wait for a full batch or for the
      // completions at hand to be handed out (#tick then flushes): fewer, larger submissions.
      const atKernel = this.#inflight - this.#prepared;
      if (
        this.#coalesceAbove > 0 && atKernel >= this.#coalesceAbove && this.#prepared < this.#batch
      ) {
        return;
      }
      this.#flushScheduled = true;
      queueMicrotask(this.#flush);
    }
  }

  /** Fills addr/len/vector for a read or write, bouncing memory the kernel cannot address. */
  #describe(slot: number, op: number, bufs: Buffers): void {
    const p = this.#prep;
    if (bufs instanceof Uint8Array) {
      const addr = addressOf(bufs);
      if (addr !== null && ((addr | bufs.length) & 511) === 0) {
        p.addr = addr;
        p.len = bufs.length;
        return;
      }
    } else if (bufs.length <= MAX_IOV) {
      const words = this.#iovWords;
      let w = slot * MAX_IOV * 4;
      let ok = true;
      for (const b of bufs) {
        const addr = addressOf(b);
        if (addr === null || ((addr | b.length) & 511) !== 0) {
          ok = false;
          break;
        }
        words[w] = addr % 0x100000000;
        words[w + 1] = Math.floor(addr / 0x100000000);
        words[w + 2] = b.length;
        words[w + 3] = 0;
        w += 4;
      }
      if (ok) {
        if (bufs.length === 1) {
          p.addr = addressOf(bufs[0])!;
          p.len = bufs[0].length;
        } else {
          p.addr = this.#iov.address + slot * MAX_IOV * IOVEC_SIZE;
          p.len = bufs.length;
          p.vector = true;
        }
        return;
      }
    }
    const total = byteLength(bufs);
    const bounce = this.#pool.take(total);
    if (op === OP_WRITE) gather(bufs, bounce);
    else this.#bounceTargets[slot] = bufs;
    this.#bounce[slot] = bounce;
    p.addr = addressOf(bounce)!;
    p.len = total;
  }

  #flush = (): void => {
    this.#flushScheduled = false;
    try {
      while (this.#prepared > 0) {
        const n = this.submitPrepared(Math.min(this.#prepared, this.#batch));
        this.#prepared -= n;
        if (n === 0) break;
      }
    } catch (e) {
      this.#failPrepared(e as Error);
    }
    if (this.#inflight > 0 && !this.#active) {
      this.#active = true;
      this.#poll?.touch();
      setImmediate(this.#tick);
    }
  };

  /** A fatal submission error: fail every request the kernel did not take. */
  #failPrepared(e: Error): void {
    this.#prepared = 0;
    for (const slot of this.takeUnsubmitted()) this.#finish(slot, e);
    if (this.#inflight === 0 && this.#parked !== null) this.eventfd.signal();
  }

  /**
   * The completion wait, a small state machine driven by callbacks (no allocation per look).
   * Completions are handed out one at a time, each followed by a microtask hop, so that the
   * request its continuation issues is submitted before the next completion is looked at: the
   * device gets work back as soon as fio would give it (completions tend to arrive in bursts,
   * and finishing a whole burst before resubmitting any of it left the device idle meanwhile).
   * A run of such hops is bounded, so a steady stream of completions cannot starve the event
   * loop. Once the ring is empty: look again on the next event-loop turn while polling, else
   * park until the eventfd is signalled.
   */
  #tick = (): void => {
    if (this.#destroyed) return;
    if (this.reapOne()) {
      this.#poll?.touch();
      if (++this.#run < MAX_RUN) queueMicrotask(this.#tick);
      else {
        this.#run = 0;
        setImmediate(this.#tick);
      }
      return;
    }
    const reaped = this.#run > 0;
    this.#run = 0;
    if (this.#inflight === 0) {
      this.#active = false;
      return;
    }
    if (reaped) {
      setImmediate(this.#tick);
      return;
    }
    if (this.#prepared > 0) {
      this.#flush();
      if (this.#prepared === 0) setImmediate(this.#tick);
      // The kernel took none: wait for a completion to free room, or, with none
      // outstanding, retry shortly (nothing would ever signal the eventfd).
      else if (this.#inflight > this.#prepared) this.#park();
      else setTimeout(this.#tick, 1);
      return;
    }
    if (this.#poll?.keepLooking()) this.#poll.schedule(this.#tick);
    else this.#park();
  };

  #park(): void {
    this.#parked = this.eventfd.wait().then(this.#woken, this.#woken);
  }

  #woken = (): void => {
    this.#parked = null;
    this.#poll?.touch();
    this.#tick();
  };

  /** Called by `reapOne()` for each completion: `res` is bytes transferred or -errno. */
  protected complete(slot: number, res: number): void {
    if (res < 0) {
      this.#finish(slot, new SysError(-res, OP_NAMES[this.#ops[slot]], this.#files[slot]!.path));
    } else {
      const bounce = this.#bounce[slot];
      if (bounce !== undefined) {
        const targets = this.#bounceTargets[slot];
        if (targets !== undefined) scatter(bounce.subarray(0, res), targets);
      }
      this.#finish(slot, res);
    }
  }

  #finish(slot: number, result: number | Error): void {
    if (this.#submitting) {
      // A batch refused while submit() flushes it: its callbacks must not run inside submit().
      queueMicrotask(() => this.#finish(slot, result));
      return;
    }
    const resolve = this.#resolve[slot]!, reject = this.#reject[slot]!;
    this.#resolve[slot] = this.#reject[slot] = undefined;
    this.#files[slot] = undefined;
    const bounce = this.#bounce[slot];
    if (bounce !== undefined) {
      this.#pool.give(bounce);
      this.#bounce[slot] = undefined;
      this.#bounceTargets[slot] = undefined;
    }
    this.#freeSlots[this.#freeTop++] = slot;
    this.#inflight--;
    if (this.#waiting.length > 0 && !this.#drainScheduled) {
      // Started from a microtask so that a subclass never sees prepare() during its own submit.
      this.#drainScheduled = true;
      queueMicrotask(this.#drainWaiting);
    }
    this.#checkIdle();
    try {
      if (typeof result === "number") resolve(result);
      else reject(result);
    } catch (e) {
      // A submit() callback threw (a bug): reported as uncaught, with the engine consistent.
      queueMicrotask(() => {
        throw e;
      });
    }
  }

  #checkIdle(): void {
    if (this.#inflight === 0 && this.#waiting.length === 0 && this.#pooled === 0) this.#idle?.();
  }

  #drainWaiting = (): void => {
    this.#drainScheduled = false;
    while (this.#freeTop > 0 && this.#waiting.length > 0) {
      const w = this.#waiting.shift()!;
      this.#start(w.op, w.file, w.offset, w.bufs, w.arg, w.length, w.resolve, w.reject);
    }
  };

  close(): Promise<void> {
    this.#closed ??= this.#close();
    return this.#closed;
  }

  async #close(): Promise<void> {
    if (this.#inflight > 0 || this.#waiting.length > 0 || this.#pooled > 0) {
      await new Promise<void>((resolve) => this.#idle = resolve);
    }
    if (this.#parked !== null) {
      this.eventfd.signal();
      await this.#parked;
    }
    this.#destroyed = true;
    this.destroy();
    this.eventfd[Symbol.dispose]();
    this.#iov[Symbol.dispose]();
  }
}

const EMPTY = new Uint8Array(0);
/** At most this many completions in one run of microtasks before the event loop turns. */
const MAX_RUN = 256;

/**
 * Defaults, measured on a virtio disk (docs/performance.md): one request per io_submit. Since
 * completions are handed out one at a time, a turn of a single caller (the bench, a ring) prepares
 * a request or two, and submitting those together measured 3% slower in the bench (the kernel
 * plugs a batch and the device sees bursts). Servers that start many requests in one turn ask
 * for SERVER_BATCH or RING_BATCH (engine.ts) instead. Polling pays only when the process is
 * pinned to CPUs away from the device's interrupt.
 */
const DEFAULT_POLL_MICROS = 0;
const DEFAULT_BATCH = 1;

function gather(bufs: Buffers, into: Uint8Array): void {
  if (bufs instanceof Uint8Array) {
    into.set(bufs);
    return;
  }
  let off = 0;
  for (const b of bufs) {
    into.set(b, off);
    off += b.length;
  }
}

function scatter(from: Uint8Array, bufs: Buffers): void {
  if (bufs instanceof Uint8Array) {
    bufs.set(from.subarray(0, bufs.length));
    return;
  }
  let off = 0;
  for (const b of bufs) {
    if (off >= from.length) break;
    b.set(from.subarray(off, off + b.length));
    off += b.length;
  }
}
