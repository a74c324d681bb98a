/**
 * One FUSE connection serving one file-root mount (protocols.md §17–§21): reads requests from
 * /dev/fuse as they come (FuseDevice drains the queue each turn, then waits on one pooled poll),
 * starts each at once without waiting for the ones before, and answers each exactly once when
 * its disk operation completes, in completion order. Every request owns a Slot until answered;
 * with all slots busy the session stops reading (the kernel keeps the rest queued).
 */
import type { Logger } from "../cli/log.ts";
import { DiskError } from "../drivers/errors.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { SysError } from "../ffi/errno.ts";
import type { FileAttributes } from "./attributes.ts";
import { ByteIo } from "./byte_io.ts";
import { type FuseDevice, READ_NONE, type ReplyChannel } from "./device.ts";
import {
  ATTR_OUT,
  FALLOCATE_IN,
  FOPEN,
  IN_HEADER,
  INIT_FLAG,
  INIT_FLAG2,
  INIT_IN,
  INIT_OUT,
  INTERRUPT_IN,
  isNoReply,
  KERNEL_MAJOR,
  LSEEK_IN,
  LSEEK_OUT_SIZE,
  MAX_BACKGROUND,
  MAX_IO,
  MAX_PAGES,
  OP,
  OPEN_IN,
  OPEN_OUT,
  OUR_MINOR,
  OUT_HEADER_SIZE,
  RW_IN,
  STATFS_OUT,
  WANTED_INIT_FLAGS,
  WRITE_DATA_OFFSET,
  WRITE_OUT_SIZE,
} from "./protocol.ts";
import { DATA, LARGE_REQUEST, READ_AT, type Slot, SlotPool } from "./slots.ts";
import { PollWindow } from "../io/poll_window.ts";

const EPERM = 1, ENOENT = 2, EIO = 5, ENXIO = 6, EINVAL = 22, ENOSPC = 28, EROFS = 30;
const ENOSYS = 38, EPROTO = 71, EOPNOTSUPP = 95;
const O_ACCMODE = 3;
/** Request bytes read from /dev/fuse before the engine gets to submit them (see #drain). */
const DRAIN_BYTES = 256 * 1024;
const FALLOC_KEEP_SIZE = 0x01, FALLOC_PUNCH_HOLE = 0x02, FALLOC_ZERO_RANGE = 0x10;
/** How long the kernel may cache the file's attributes (they change only through us). */
const ATTR_VALID_SECONDS = 3600n;

/**
 * What a handler returns for a request it started in callback form (a plain read or write): it
 * is in flight, and its callback answers it and calls #settled.
 */
const PENDING = Symbol("pending");
/** Reads this large are answered straight from read-ahead windows when they cover them. */
const IN_PLACE = 32 * 1024;
type Handled = void | Promise<void> | typeof PENDING;

/** One request being served: its slot, and where its parts are in the slot. */
interface Request {
  slot: Slot;
  /** Where it is answered: the session's descriptor, an I/O thread's clone or a ring entry. */
  device: ReplyChannel;
  opcode: number;
  /** The request's unique id, as two 32-bit halves (echoed in the reply). */
  lo: number;
  hi: number;
  /** Offset of the operation's input struct in the slot. */
  body: number;
  /** Total request length. */
  length: number;
}

export interface SessionOptions {
  attributes: FileAttributes;
  readOnly: boolean;
  /** Every open bypasses the page cache (FOPEN_DIRECT_IO). */
  directIo?: boolean;
  log: Logger;
  /** Requests in flight at most (each holds a slot of MAX_IO + 12 KiB). */
  maxRequests?: number;
  /**
   * Keep reading /dev/fuse (a non-blocking read per look) instead of parking the pooled poll,
   * until this many µs pass without a request arriving or being answered (default 0).
   */
  pollMicros?: number;
  /**
   * A descriptor of the file holding the disk byte for byte: ask the kernel for passthrough
   * (Linux 6.9+), so that opens of the export read and write this file themselves and only the
   * other operations (attributes, fsync, fallocate, lseek) come here. Without kernel support the
   * session serves everything itself (`passthrough` says which).
   */
  backingFd?: number;
  /**
   * Ask for FUSE over io_uring (Linux 6.14+, the fuse module's enable_uring on): `uring` then
   * says whether INIT agreed, and fuse/uring.ts registers the ring entries.
   */
  uring?: boolean;
}

/** The errno to answer for a failed operation. */
export function errnoOf(e: unknown): number {
  if (e instanceof DiskError || e instanceof SysError) {
    return e.errno > 0 && e.errno < 512 ? e.errno : EIO;
  }
  return EIO;
}

/** Resolves on the next event-loop turn (after timers, I/O completions and other immediates). */
function nextTurn(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}

export class FuseSession {
  readonly #device: FuseDevice;
  readonly #target: BlockTarget;
  readonly #io: ByteIo;
  readonly #attrs: FileAttributes;
  readonly #readOnly: boolean;
  readonly #openFlags: number;
  readonly #log: Logger;
  readonly #slots: SlotPool;
  readonly #poll: PollWindow | null;
  readonly #scratch = new Uint8Array(256);
  readonly #sv = new DataView(this.#scratch.buffer);
  #inflight = 0;
  /** The last READ or WRITE was large: the next request is read into a huge-page slot. */
  #large = false;
  #drainQueued = false;
  /** The connection ended (a read said so). */
  #gone = false;
  #idle: (() => void) | null = null;
  /** Set once I/O threads read the requests (handOff): resolves when they have all stopped. */
  #threadsEnded: Promise<"gone" | "failed"> | null = null;
  #nextHandle = 1n;
  #initialized = Promise.withResolvers<void>();
  readonly #backingFd: number | null;
  /** The backing file's id on this connection once passthrough is set up, else 0. */
  #backingId = 0;
  readonly #wantUring: boolean;
  /** INIT agreed on FUSE over io_uring. */
  uring = false;
  /** Why passthrough was asked for and is off, once INIT has been answered. */
  passthroughRefused: string | null = null;
  /** Requests read so far. */
  requests = 0;

  constructor(device: FuseDevice, target: BlockTarget, options: SessionOptions) {
    this.#device = device;
    this.#target = target;
    this.#io = new ByteIo(target);
    this.#attrs = options.attributes;
    this.#readOnly = options.readOnly;
    // Concurrent O_DIRECT writers (a loop device) are not serialized on the inode lock.
    this.#openFlags = FOPEN.PARALLEL_DIRECT_WRITES | (options.directIo ? FOPEN.DIRECT_IO : 0);
    this.#log = options.log;
    this.#slots = new SlotPool(options.maxRequests ?? 2 * MAX_BACKGROUND);
    this.#poll = options.pollMicros ? new PollWindow(options.pollMicros) : null;
    this.#backingFd = options.backingFd ?? null;
    this.#wantUring = options.uring ?? false;
  }

  /** Opens are passthrough: the kernel reads and writes the backing file itself. */
  get passthrough(): boolean {
    return this.#backingId > 0;
  }

  /** Resolves once the kernel's INIT has been answered (the mount is usable from then on). */
  get initialized(): Promise<void> {
    return this.#initialized.promise;
  }

  /** Requests being served now. */
  get inflight(): number {
    return this.#inflight;
  }

  /**
   * Serves until the connection ends (unmounted, or aborted), then waits until every request
   * started has finished. Rejects only on an unexpected error reading the device.
   */
  async run(): Promise<void> {
    try {
      for (;;) {
        const state = this.#drain();
        if (state === "gone") {
          this.#gone = true;
          break;
        }
        if (state === "handed") {
          // The I/O threads read every request now; if they stop while the connection is
          // still there (they failed), this thread reads again.
          if ((await this.#threadsEnded!) === "gone") {
            this.#gone = true;
            break;
          }
          this.#threadsEnded = null;
          continue;
        }
        if (state === "more") await nextTurn(); // see #drain
        else if (state === "full") await this.#slots.freed();
        else if (this.#poll?.keepLooking()) await this.#poll.next();
        else await this.#device.readable();
        if (this.#gone) break;
      }
    } finally {
      this.#initialized.reject(new Error("the FUSE connection ended before INIT"));
      this.#initialized.promise.catch(() => {});
      while (this.#inflight > 0) await new Promise<void>((resolve) => this.#idle = resolve);
    }
  }

  /** Frees the slots; only after run() has finished. */
  [Symbol.dispose](): void {
    this.#slots[Symbol.dispose]();
  }

  /**
   * After replies: new requests are often queued by then (a loop device sends the next as soon
   * as one completes), so drain at the end of this turn instead of waiting for the parked
   * poll's wake-up to come back from the thread pool.
   */
  #drainSoon(): void {
    if (this.#drainQueued || this.#gone || this.#threadsEnded !== null) return;
    this.#drainQueued = true;
    queueMicrotask(() => {
      this.#drainQueued = false;
      if (this.#gone) return;
      try {
        const state = this.#drain();
        if (state === "gone") this.#gone = true;
        else if (state === "more") setImmediate(this.#drainSoonCallback);
      } catch (e) {
        this.#log.error("reading /dev/fuse failed", { error: (e as Error).message });
      }
    });
  }

  readonly #drainSoonCallback = (): void => this.#drainSoon();

  /**
   * Reads and starts every queued request, or stops ("more") once DRAIN_BYTES have been read:
   * the engine submits at the end of the turn, and reading a burst of large writes (each a copy
   * of its data) before any of them reaches the disk leaves the disk idle meanwhile. Reading
   * goes on from the next event-loop turn, not the next microtask: in between, the engine reaps
   * the completions that came meanwhile (a stream of 1 MiB writes otherwise kept the loop busy
   * reading, and each write's completion waited ~13 ms to be seen, its group-committed table
   * writes too).
   */
  #drain(): "empty" | "full" | "gone" | "more" | "handed" {
    let bytes = 0;
    for (;;) {
      if (this.#threadsEnded !== null) return "handed";
      if (bytes >= DRAIN_BYTES) return "more";
      const slot = this.#slots.take(this.#large);
      if (slot === null) return "full";
      let n: number;
      try {
        n = this.#device.read(slot.readArea);
      } catch (e) {
        this.#slots.give(slot);
        throw e;
      }
      if (n <= 0) {
        this.#slots.give(slot);
        return n === READ_NONE ? "empty" : "gone";
      }
      this.#poll?.touch();
      this.#dispatch(slot, n, this.#device);
      bytes += n;
    }
  }

  /**
   * From now on, I/O threads on clones of the descriptor read the requests (fuse/io_threads.ts):
   * this thread stops reading once `ended` is pending, and serves what they hand it
   * (serveHanded). `ended` says why they stopped: "gone" ends the session.
   */
  handOff(ended: Promise<"gone" | "failed">): void {
    this.#threadsEnded = ended;
  }

  /** Serves a request an I/O thread read on `device` (a copy of its bytes); answers it there. */
  async serveHanded(bytes: Uint8Array, device: ReplyChannel): Promise<void> {
    // Counted while it waits for a slot, so that run() does not end (and free the slots) first.
    this.#inflight++;
    let slot: Slot | null;
    while ((slot = this.#slots.take(bytes.length >= LARGE_REQUEST)) === null) {
      await this.#slots.freed();
    }
    slot.readArea.set(bytes);
    this.#dispatch(slot, bytes.length, device);
    this.#left();
  }

  #dispatch(slot: Slot, n: number, device: ReplyChannel): void {
    const v = slot.view;
    const req: Request = {
      slot,
      device,
      opcode: v.getUint32(READ_AT + IN_HEADER.opcode, true),
      lo: v.getUint32(READ_AT + IN_HEADER.unique, true),
      hi: v.getUint32(READ_AT + IN_HEADER.unique + 4, true),
      body: READ_AT + IN_HEADER.size,
      length: v.getUint32(READ_AT + IN_HEADER.len, true),
    };
    this.requests++;
    let work: Handled = undefined;
    try {
      if (req.length !== n) throw new DiskError("EIO", `request of ${n} bytes says ${req.length}`);
      work = this.#handle(req);
    } catch (e) {
      if (!isNoReply(req.opcode)) this.#fail(req, e);
    }
    if (work === undefined) {
      this.#slots.give(slot);
      return;
    }
    this.#inflight++;
    if (work === PENDING) return;
    work.catch((e) => this.#replyFailed(req, e)).then(() => this.#settled(slot));
  }

  #replyFailed(req: Request, e: unknown): void {
    this.#log.error("replying failed", { opcode: req.opcode, error: (e as Error).message });
  }

  /** A request in flight has been answered: its slot is free. */
  #settled(slot: Slot): void {
    this.#slots.give(slot);
    this.#poll?.touch();
    this.#drainSoon();
    this.#left();
  }

  /** One request less in flight; wakes run()'s final wait at 0. */
  #left(): void {
    if (--this.#inflight === 0 && this.#idle !== null) {
      const idle = this.#idle;
      this.#idle = null;
      idle();
    }
  }

  #handle(req: Request): Handled {
    switch (req.opcode) {
      case OP.INIT:
        return this.#init(req);
      case OP.READ:
        return this.#read(req);
      case OP.WRITE:
        return this.#write(req);
      case OP.GETATTR:
        return this.#replyAttr(req);
      case OP.SETATTR:
        return this.#setattr(req);
      case OP.OPEN:
        return this.#open(req);
      case OP.FSYNC:
        if (this.#readOnly) return this.#ok(req);
        return this.#finish(req, this.#target.flush());
      case OP.FLUSH: // close(2): not a durability point; FSYNC is
      case OP.RELEASE:
        return this.#ok(req);
      case OP.FALLOCATE:
        return this.#fallocate(req);
      case OP.LSEEK:
        return this.#lseek(req);
      case OP.STATFS:
        return this.#statfs(req);
      case OP.LOOKUP: // a file root has no names under it
        return this.#error(req, ENOENT);
      case OP.INTERRUPT:
        // Answered ENOSYS (with the INTERRUPT's own id), the kernel sends no more; every
        // request still gets its one reply when its operation ends.
        this.#log.debug("interrupt", {
          unique: String(req.slot.view.getBigUint64(req.body + INTERRUPT_IN.unique, true)),
        });
        return this.#error(req, ENOSYS);
      case OP.DESTROY:
        return this.#ok(req);
      case OP.FORGET:
      case OP.BATCH_FORGET:
      case OP.NOTIFY_REPLY:
        return; // never answered
      default:
        return this.#error(req, ENOSYS);
    }
  }

  // ---- replies ----

  /** Writes an out header at `at` of `v`. */
  #header(v: DataView, at: number, length: number, errno: number, req: Request): void {
    v.setUint32(at, length, true);
    v.setInt32(at + 4, -errno, true);
    v.setUint32(at + 8, req.lo, true);
    v.setUint32(at + 12, req.hi, true);
  }

  #error(req: Request, errno: number): void {
    this.#header(this.#sv, 0, OUT_HEADER_SIZE, errno, req);
    req.device.write(this.#scratch.subarray(0, OUT_HEADER_SIZE));
  }

  #ok(req: Request): void {
    this.#header(this.#sv, 0, OUT_HEADER_SIZE, 0, req);
    req.device.write(this.#scratch.subarray(0, OUT_HEADER_SIZE));
  }

  /** A success reply with a `size`-byte body that `fill(view, offset)` writes. */
  #reply(req: Request, size: number, fill: (v: DataView, at: number) => void): void {
    this.#scratch.fill(0, 0, OUT_HEADER_SIZE + size);
    this.#header(this.#sv, 0, OUT_HEADER_SIZE + size, 0, req);
    fill(this.#sv, OUT_HEADER_SIZE);
    req.device.write(this.#scratch.subarray(0, OUT_HEADER_SIZE + size));
  }

  #fail(req: Request, e: unknown): void {
    const errno = errnoOf(e);
    const fields = { opcode: req.opcode, errno, error: (e as Error).message };
    if (errno === EIO) this.#log.warn("request failed", fields);
    else this.#log.debug("request failed", fields);
    this.#error(req, errno);
  }

  /** Answers `req` with an empty success once `work` is done, or with its error. */
  #finish(req: Request, work: Promise<void>): Promise<void> {
    return work.then(() => this.#ok(req), (e) => this.#fail(req, e));
  }

  // ---- operations ----

  #init(req: Request): void {
    const v = req.slot.view, b = req.body;
    const major = v.getUint32(b + INIT_IN.major, true);
    const minor = v.getUint32(b + INIT_IN.minor, true);
    if (major < KERNEL_MAJOR) return this.#error(req, EPROTO);
    if (major > KERNEL_MAJOR) {
      // Only major and minor: the kernel then sends a second INIT for our major.
      return this.#reply(req, 8, (o, at) => {
        o.setUint32(at + INIT_OUT.major, KERNEL_MAJOR, true);
        o.setUint32(at + INIT_OUT.minor, OUR_MINOR, true);
      });
    }
    const kernelFlags = v.getUint32(b + INIT_IN.flags, true);
    let flags = (WANTED_INIT_FLAGS & kernelFlags) >>> 0;
    const size = minor < 5 ? 8 : minor < 23 ? INIT_OUT.compatSize : INIT_OUT.size;
    let flags2 = 0;
    const kernelFlags2 = req.length >= INIT_IN.flags2 + 4 + IN_HEADER.size &&
        (kernelFlags & INIT_FLAG.INIT_EXT) !== 0 && size === INIT_OUT.size
      ? v.getUint32(b + INIT_IN.flags2, true)
      : 0;
    if (this.#backingFd !== null) {
      if ((kernelFlags2 & INIT_FLAG2.PASSTHROUGH) !== 0) {
        flags2 |= INIT_FLAG2.PASSTHROUGH;
      } else {
        this.passthroughRefused = "the kernel does not offer FUSE passthrough (Linux 6.9+)";
      }
    }
    if (this.#wantUring && (kernelFlags2 & INIT_FLAG2.OVER_IO_URING) !== 0) {
      flags2 |= INIT_FLAG2.OVER_IO_URING;
      this.uring = true;
    }
    if (flags2 !== 0) flags = (flags | INIT_FLAG.INIT_EXT) >>> 0;
    this.#reply(req, size, (o, at) => {
      o.setUint32(at + INIT_OUT.major, KERNEL_MAJOR, true);
      o.setUint32(at + INIT_OUT.minor, Math.min(minor, OUR_MINOR), true);
      if (size === 8) return;
      o.setUint32(at + INIT_OUT.maxReadahead, v.getUint32(b + INIT_IN.maxReadahead, true), true);
      o.setUint32(at + INIT_OUT.flags, flags, true);
      o.setUint16(at + INIT_OUT.maxBackground, MAX_BACKGROUND, true);
      o.setUint16(at + INIT_OUT.congestionThreshold, (MAX_BACKGROUND * 3) >> 2, true);
      o.setUint32(at + INIT_OUT.maxWrite, MAX_IO, true);
      if (size === INIT_OUT.size) {
        o.setUint32(at + INIT_OUT.timeGran, 1, true);
        o.setUint16(at + INIT_OUT.maxPages, MAX_PAGES, true);
        o.setUint32(at + INIT_OUT.flags2, flags2, true);
        // The backing file's own file system (depth 0) may sit under this one, no deeper.
        if ((flags2 & INIT_FLAG2.PASSTHROUGH) !== 0) {
          o.setUint32(at + INIT_OUT.maxStackDepth, 1, true);
        }
      }
    });
    if ((flags2 & INIT_FLAG2.PASSTHROUGH) !== 0) {
      // The kernel applied the reply within write(2): the connection takes backing files now.
      try {
        this.#backingId = this.#device.openBacking(this.#backingFd!);
      } catch (e) {
        this.passthroughRefused = (e as Error).message;
      }
    }
    this.#log.debug("connection initialized", {
      kernel: `${major}.${minor}`,
      protocol: `${KERNEL_MAJOR}.${Math.min(minor, OUR_MINOR)}`,
      flags: "0x" + flags.toString(16),
    });
    this.#initialized.resolve();
  }

  #read(req: Request): Handled {
    const v = req.slot.view, b = req.body, size = this.#io.size;
    const offset = Number(v.getBigUint64(b + RW_IN.offset, true));
    const wanted = v.getUint32(b + RW_IN.length, true);
    this.#large = wanted >= LARGE_REQUEST;
    if (offset >= size || wanted === 0) return this.#ok(req); // end of file: no data
    const length = Math.min(wanted, size - offset, MAX_IO);
    const slot = req.slot;
    const answer = (skip: number): void => {
      const at = DATA + skip - OUT_HEADER_SIZE;
      this.#header(slot.view, at, OUT_HEADER_SIZE + length, 0, req);
      req.device.write(slot.bytes.subarray(at, at + OUT_HEADER_SIZE + length));
    };
    if (length >= IN_PLACE && req.device.writeParts !== undefined) {
      // Read ahead: the reply is written from the windows, without copying them here first.
      const at = DATA - OUT_HEADER_SIZE;
      const header = slot.bytes.subarray(at, DATA);
      const served = this.#io.readInPlace(offset, length, (parts) => {
        this.#header(slot.view, at, OUT_HEADER_SIZE + length, 0, req);
        if (req.device.writeParts!([header, ...parts]) !== null) return;
        let to = DATA;
        for (const part of parts) {
          slot.bytes.set(part, to);
          to += part.length;
        }
        answer(0);
      });
      if (served) return;
    }
    const direct = slot.bytes.subarray(DATA, DATA + length);
    if (this.#io.submitAligned(false, offset, direct, (e) => this.#answer(req, e, answer))) {
      return PENDING;
    }
    return this.#io.readInto(slot.bytes.subarray(DATA), offset, length).then(
      answer,
      (e) => this.#fail(req, e),
    );
  }

  #write(req: Request): Handled {
    const v = req.slot.view, b = req.body;
    const offset = Number(v.getBigUint64(b + RW_IN.offset, true));
    const length = v.getUint32(b + RW_IN.length, true);
    this.#large = length >= LARGE_REQUEST;
    if (req.length !== WRITE_DATA_OFFSET + length) return this.#error(req, EINVAL);
    if (this.#readOnly) return this.#error(req, EROFS);
    if (offset + length > this.#io.size) return this.#error(req, ENOSPC);
    const replied = () =>
      this.#reply(req, WRITE_OUT_SIZE, (o, at) => o.setUint32(at, length, true));
    if (length === 0) return replied();
    const data = req.slot.data(length);
    if (this.#io.submitAligned(true, offset, data, (e) => this.#answer(req, e, replied))) {
      return PENDING;
    }
    return this.#io.write(offset, data).then(replied, (e) => this.#fail(req, e));
  }

  /** Ends a request started in callback form: `reply(0)` on success, else its error. */
  #answer(req: Request, e: Error | null, reply: (skip: number) => void): void {
    try {
      if (e === null) reply(0);
      else this.#fail(req, e);
    } catch (err) {
      this.#replyFailed(req, err);
    }
    this.#settled(req.slot);
  }

  #replyAttr(req: Request): void {
    this.#reply(req, ATTR_OUT.size, (o, at) => {
      o.setBigUint64(at + ATTR_OUT.attrValid, ATTR_VALID_SECONDS, true);
      this.#attrs.encode(o, at + ATTR_OUT.attr);
    });
  }

  #setattr(req: Request): void {
    const refused = this.#attrs.apply(req.slot.view, req.body);
    if (refused !== null) {
      this.#log.warn("refused a size change: a disk keeps its size", {
        size: this.#io.size,
        requested: refused,
      });
      return this.#error(req, EPERM);
    }
    this.#replyAttr(req);
  }

  #open(req: Request): void {
    const flags = req.slot.view.getUint32(req.body + OPEN_IN.flags, true);
    if (this.#readOnly && (flags & O_ACCMODE) !== 0) return this.#error(req, EROFS);
    const fh = this.#nextHandle++;
    const backingId = this.#backingId;
    this.#reply(req, OPEN_OUT.size, (o, at) => {
      o.setBigUint64(at + OPEN_OUT.fh, fh, true);
      if (backingId > 0) {
        // Reads, writes and mmap of this open go to the backing file, not here.
        const flags = (this.#openFlags & ~FOPEN.DIRECT_IO) | FOPEN.PASSTHROUGH;
        o.setUint32(at + OPEN_OUT.openFlags, flags, true);
        o.setInt32(at + OPEN_OUT.backingId, backingId, true);
      } else {
        o.setUint32(at + OPEN_OUT.openFlags, this.#openFlags, true);
      }
    });
  }

  #fallocate(req: Request): void | Promise<void> {
    const v = req.slot.view, b = req.body, size = this.#io.size;
    const offset = Number(v.getBigUint64(b + FALLOCATE_IN.offset, true));
    const length = Number(v.getBigUint64(b + FALLOCATE_IN.length, true));
    const mode = v.getUint32(b + FALLOCATE_IN.mode, true);
    if ((mode & ~(FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE)) !== 0) {
      return this.#error(req, EOPNOTSUPP);
    }
    if (this.#readOnly) return this.#error(req, EROFS);
    let end = offset + length;
    if (end > size) {
      if ((mode & FALLOC_KEEP_SIZE) === 0) return this.#error(req, ENOSPC); // would grow it
      end = size;
    }
    if (offset >= end) return this.#ok(req);
    if ((mode & FALLOC_PUNCH_HOLE) !== 0) {
      // A hole must read back as zeros. Where discarding frees nothing (an image over a
      // backing file) punching would mean writing zeros: say so, and the loop device (or
      // whoever asked) falls back to writing zeros itself, or skips the discard.
      if (!this.#target.info.discardFreesSpace) return this.#error(req, EOPNOTSUPP);
      return this.#finish(req, this.#io.zero(offset, end - offset, true));
    }
    if ((mode & FALLOC_ZERO_RANGE) !== 0) {
      return this.#finish(req, this.#io.zero(offset, end - offset, false));
    }
    return this.#ok(req); // preallocation inside the disk: it is all there already
  }

  #lseek(req: Request): Promise<void> {
    const v = req.slot.view, b = req.body;
    const offset = Number(v.getBigInt64(b + LSEEK_IN.offset, true));
    const whence = v.getUint32(b + LSEEK_IN.whence, true);
    return this.#io.seek(offset, whence).then((found) => {
      if (found === null) return this.#error(req, ENXIO);
      this.#reply(req, LSEEK_OUT_SIZE, (o, at) => o.setBigUint64(at, BigInt(found), true));
    }, (e) => this.#fail(req, e));
  }

  #statfs(req: Request): void {
    // Loop devices take f_bsize as their discard granularity.
    const bsize = Math.max(4096, this.#target.info.logicalSectorSize);
    this.#reply(req, STATFS_OUT.size, (o, at) => {
      o.setBigUint64(at + STATFS_OUT.blocks, BigInt(Math.floor(this.#io.size / bsize)), true);
      o.setBigUint64(at + STATFS_OUT.files, 1n, true);
      o.setUint32(at + STATFS_OUT.bsize, bsize, true);
      o.setUint32(at + STATFS_OUT.namelen, 255, true);
      o.setUint32(at + STATFS_OUT.frsize, bsize, true);
    });
  }
}
