/**
 * One FUSE I/O thread (a Worker; fuse/io_threads.ts starts them). It owns a clone of the
 * connection's /dev/fuse descriptor (FUSE_DEV_IOC_CLONE) and an aio context, and runs its own
 * loop, without Deno's event loop or its thread pool: read every queued request (non-blocking),
 * submit the reads and writes of the raw image as one io_submit batch, reap completions from the
 * kernel's ring and write the replies, then block in poll(2) on the descriptor and the completion
 * eventfd until there is more. Blocking is this thread's job; the main event loop never waits.
 * Everything else it reads (attributes, fsync, fallocate, unaligned or out-of-range requests,
 * anything while the disk is held) is handed to the session on the main thread, which answers
 * it on this thread's descriptor.
 *
 * Request memory is laid out as fuse/slots.ts lays out a slot (a WRITE's data lands page-aligned
 * and goes to the disk as it is; a READ's data is read where its reply goes out): `depth` slots
 * of ordinary pages, for small requests, and HUGE_SLOTS in transparent huge pages, for large ones.
 */
/// <reference lib="deno.worker" />
import { FENCE, FENCE_OPEN } from "../drivers/direct_access.ts";
import {
  IO_EVENT_SIZE,
  IOCB_CMD_PREAD,
  IOCB_CMD_PWRITE,
  IOCB_FLAG_RESFD,
  IOCB_SIZE,
  libaio,
} from "../ffi/aio.ts";
import { lastErrno, SysError } from "../ffi/errno.ts";
import { EPOLLEXCLUSIVE, EPOLLIN } from "../ffi/constants.ts";
import { Epoll, EventFd } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { AlignedMemory, foreignMemory } from "../ffi/memory.ts";
import { OpStats, STATS_CELLS } from "../serve/stats.ts";
import type { IoThreadMessage, IoThreadSetup } from "./io_thread_messages.ts";
import { IN_HEADER, OP, OUT_HEADER_SIZE, RW_IN, WRITE_DATA_OFFSET } from "./protocol.ts";
import { DATA, HUGE_SLOTS, LARGE_REQUEST, READ_AT, SLOT_SIZE } from "./slots.ts";
import { SERVER_BATCH, SERVER_COALESCE } from "../io/engine.ts";
import { failpoint } from "./failpoint.ts";

const ENOENT = 2, EINTR = 4, EIO = 5, ENODEV = 19, ECONNABORTED = 103;
const POLLIN = 1;
const AIO_RING_MAGIC = 0xa10a10a1;
const RING_HEAD = 2, RING_TAIL = 3, RING_EVENTS = 8; // u32 word indexes
const HUGE_PAGE = 2 * 1024 * 1024;
const DRAIN_BYTES = 256 * 1024;

function post(message: IoThreadMessage): void {
  self.postMessage(message);
}

/** One request's memory, made once. */
interface Slot {
  bytes: Uint8Array<ArrayBuffer>;
  view: DataView;
  /** Where a request is read (from READ_AT to the end). */
  readArea: Uint8Array<ArrayBuffer>;
  huge: boolean;
  /** Its iocb's address. */
  iocb: bigint;
  /** The request in flight: its length, whether a write, and its stats start time. */
  length: number;
  write: boolean;
  start: number;
}

class IoLoop implements Disposable {
  readonly #setup: IoThreadSetup;
  readonly #cleanup = new DisposableStack();
  readonly #aio = libaio();
  readonly #ctx: bigint;
  readonly #ring: Uint32Array;
  readonly #ringSize: number;
  readonly #completions: EventFd;
  readonly #fence: Int32Array;
  readonly #readStats: OpStats;
  readonly #writeStats: OpStats;
  readonly #slots: Slot[] = [];
  /** The iocbs (one per slot, in slot order) and the address of the first. */
  readonly #iocbs: DataView;
  readonly #iocbBase: bigint;
  readonly #free: Slot[] = [];
  readonly #hugeFree: Slot[] = [];
  /** The iocb pointer array for io_submit, and its words. */
  readonly #batch: Uint8Array<ArrayBuffer>;
  readonly #batchWords: BigUint64Array;
  /** The clone (shared with the other threads: one of them is woken a request) and the eventfd. */
  readonly #epoll: Epoll;
  /** The eventfd alone, for poll(2) while every slot is busy. */
  readonly #pollfds: Int32Array;
  readonly #counter = new BigUint64Array(1);
  /** Requests at the kernel, and prepared ones not yet submitted (their iocbs in #batch). */
  #inflight = 0;
  #pending = 0;
  /** Requests counted into the fence and not yet answered (owed a reply). */
  #owed = 0;
  #gone = false;
  /** TAPD_FAILPOINT=fuse-thread (tests): fail with the first batch at the disk. */
  readonly #failpoint = failpoint("fuse-thread");
  /** The last READ or WRITE was large: read the next request into a huge-page slot. */
  #large = false;

  constructor(setup: IoThreadSetup) {
    this.#setup = setup;
    this.#fence = new Int32Array(setup.fence);
    const cells = (i: number) =>
      new Float64Array(setup.stats, setup.statsAt + i * STATS_CELLS * 8, STATS_CELLS);
    this.#readStats = new OpStats(cells(0));
    this.#writeStats = new OpStats(cells(1));
    const depth = setup.depth + HUGE_SLOTS;
    try {
      const ctxOut = new BigUint64Array(1);
      const rc = this.#aio.io_setup(depth, ctxOut);
      if (rc < 0) throw new SysError(-rc, "io_setup");
      const ctx = this.#ctx = ctxOut[0];
      this.#cleanup.defer(() => this.#aio.io_destroy(ctx));
      const header = new Uint32Array(foreignMemory(ctx, 32));
      if (header[4] !== AIO_RING_MAGIC) throw new Error("libaio: unknown completion ring layout");
      this.#ringSize = header[1];
      this.#ring = new Uint32Array(foreignMemory(ctx, 32 + this.#ringSize * IO_EVENT_SIZE));
      this.#completions = this.#cleanup.use(new EventFd());
      this.#pollfds = new Int32Array([this.#completions.fd, POLLIN]);
      this.#epoll = this.#cleanup.use(new Epoll());
      // Exclusive: a request wakes one of the threads, not all of them (plain poll(2) would).
      this.#epoll.add(setup.fuseFd, EPOLLIN | EPOLLEXCLUSIVE);
      this.#epoll.add(this.#completions.fd, EPOLLIN);

      const control = this.#cleanup.use(new AlignedMemory(depth * (IOCB_SIZE + 8), 64));
      control.bytes.fill(0); // posix_memalign does not clear; an iocb has reserved fields
      const cv = new DataView(control.bytes.buffer);
      this.#batch = control.bytes.subarray(depth * IOCB_SIZE);
      this.#batchWords = new BigUint64Array(control.bytes.buffer, depth * IOCB_SIZE, depth);
      const plain = this.#cleanup.use(new AlignedMemory(setup.depth * SLOT_SIZE, 4096));
      // Huge pages: a 1 MiB request reaches the disk in one or two segments, not 256.
      const hugeSize = Math.ceil(HUGE_SLOTS * SLOT_SIZE / HUGE_PAGE) * HUGE_PAGE;
      const huge = this.#cleanup.use(
        new AlignedMemory(hugeSize, HUGE_PAGE, { hugePages: true }),
      );
      for (let i = 0; i < depth; i++) {
        const isHuge = i >= setup.depth;
        const memory = isHuge ? huge : plain;
        const at = (isHuge ? i - setup.depth : i) * SLOT_SIZE;
        const bytes = memory.bytes.subarray(at, at + SLOT_SIZE);
        const iocb = i * IOCB_SIZE;
        cv.setBigUint64(iocb, BigInt(i), true); // aio_data: the slot
        cv.setUint32(iocb + 20, setup.imageFd, true);
        cv.setBigUint64(iocb + 24, BigInt(memory.address + at + DATA), true);
        cv.setUint32(iocb + 56, IOCB_FLAG_RESFD, true);
        cv.setUint32(iocb + 60, this.#completions.fd, true);
        const slot: Slot = {
          bytes,
          view: new DataView(bytes.buffer, bytes.byteOffset, SLOT_SIZE),
          readArea: bytes.subarray(READ_AT),
          huge: isHuge,
          iocb: BigInt(control.address + iocb),
          length: 0,
          write: false,
          start: -1,
        };
        this.#slots.push(slot);
        (isHuge ? this.#hugeFree : this.#free).unshift(slot);
      }
      this.#iocbs = cv;
      this.#iocbBase = BigInt(control.address);
    } catch (e) {
      this.#cleanup.dispose();
      throw e;
    }
  }

  [Symbol.dispose](): void {
    this.#cleanup.dispose();
  }

  /**
   * After a failure, once disposed (io_destroy has waited for the disk): takes the requests
   * left unanswered out of the fence, so that a pause or close does not wait for them. True
   * if there were any: the kernel still waits for their replies.
   */
  abandon(): boolean {
    const owed = this.#owed;
    while (this.#owed > 0) this.#left();
    return owed > 0;
  }

  /** Serves until the connection ends and every request taken has been answered. */
  run(): void {
    for (;;) {
      const read = this.#readAll();
      // Coalescing, as the event loop's engine does (io/engine.ts SERVER_COALESCE): with enough
      // at the kernel, prepared requests wait for a full batch or until the completions at hand
      // have been answered, so that fewer io_submit calls (each a virtio kick) carry more.
      if (
        this.#pending > 0 && (this.#inflight < SERVER_COALESCE || this.#pending >= SERVER_BATCH)
      ) {
        this.#submit();
      }
      if (this.#reap()) continue;
      if (this.#pending > 0) {
        this.#submit();
        continue;
      }
      if (this.#gone && this.#inflight === 0) return;
      if (!read) this.#wait();
    }
  }

  #take(): Slot | undefined {
    return this.#large
      ? this.#hugeFree.pop() ?? this.#free.pop()
      : this.#free.pop() ?? this.#hugeFree.pop();
  }

  #give(slot: Slot): void {
    (slot.huge ? this.#hugeFree : this.#free).push(slot);
  }

  /**
   * Reads the queued requests (while slots last, up to DRAIN_BYTES) and submits the reads and
   * writes. The cap is the event loop's (fuse/session.ts): reading copies a write's data, and a
   * burst of 1 MiB writes read whole before any was submitted left the disk idle meanwhile; the
   * loop reaps and comes back for the rest.
   */
  #readAll(): boolean {
    const { fuseFd } = this.#setup;
    let count = 0, bytes = 0;
    while (!this.#gone && bytes < DRAIN_BYTES) {
      const slot = this.#take();
      if (slot === undefined) break;
      const area = slot.readArea;
      const n = Number(libc.read(fuseFd, area, BigInt(area.length)));
      if (n < 0) {
        this.#give(slot);
        const errno = lastErrno();
        // ENOENT: the request was interrupted before it was copied.
        if (errno === EINTR || errno === ENOENT) continue;
        if (errno === ENODEV || errno === ECONNABORTED) this.#gone = true;
        else if (errno !== 11) throw new SysError(errno, "read", "/dev/fuse"); // 11: EAGAIN
        break;
      }
      count++;
      bytes += n;
      if (this.#prepare(slot, n)) this.#batchWords[this.#pending++] = slot.iocb;
      else {
        post({ kind: "request", bytes: area.slice(0, n) });
        this.#give(slot);
      }
    }
    return count > 0;
  }

  /** Fills the slot's iocb if its request is a read or write this thread serves. */
  #prepare(slot: Slot, n: number): boolean {
    const { size, alignment, readOnly } = this.#setup;
    const v = slot.view;
    const opcode = v.getUint32(READ_AT + IN_HEADER.opcode, true);
    const write = opcode === OP.WRITE;
    if (opcode !== OP.READ && (!write || readOnly)) return false;
    const body = READ_AT + IN_HEADER.size;
    const offset = Number(v.getBigUint64(body + RW_IN.offset, true));
    const length = v.getUint32(body + RW_IN.length, true);
    this.#large = length >= LARGE_REQUEST;
    // Only low bits matter for alignment, so `|` on offsets past 4 GiB is fine.
    if (length === 0 || ((offset | length) & (alignment - 1)) !== 0) return false;
    if (offset + length > size || (write && n !== WRITE_DATA_OFFSET + length)) return false;
    const fence = this.#fence;
    Atomics.add(fence, FENCE.inflight, 1);
    this.#owed++;
    if (Atomics.load(fence, FENCE.state) !== FENCE_OPEN) {
      this.#left();
      return false;
    }
    slot.length = length;
    slot.write = write;
    slot.start = (write ? this.#writeStats : this.#readStats).start();
    const iocb = Number(slot.iocb - this.#iocbBase);
    this.#iocbs.setUint16(iocb + 16, write ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD, true);
    this.#iocbs.setBigUint64(iocb + 32, BigInt(length), true);
    this.#iocbs.setBigInt64(iocb + 40, BigInt(offset), true);
    return true;
  }

  /** Submits the prepared requests. */
  #submit(): void {
    const batch = this.#pending;
    this.#pending = 0;
    let sent = 0;
    while (sent < batch) {
      const rc = this.#aio.io_submit(
        this.#ctx,
        BigInt(batch - sent),
        this.#batch.subarray(sent * 8),
      );
      if (rc === -EINTR) continue;
      if (rc <= 0) {
        // The first iocb left was refused (or no room, which depth rules out): fail the rest.
        for (let i = sent; i < batch; i++) {
          const slot = this.#slots[Number(this.#batchWords[i] - this.#iocbBase) / IOCB_SIZE];
          this.#finish(slot, rc < 0 ? -rc : EIO);
        }
        return;
      }
      sent += rc;
      this.#inflight += rc;
    }
    if (this.#failpoint) throw new Error("failpoint fuse-thread: failing with requests in flight");
  }

  /**
   * Completions straight from the kernel's ring at the context's address, as fio's
   * userspace_reap and io/aio_engine.ts do: no system call.
   */
  #reap(): boolean {
    const r = this.#ring;
    let count = 0;
    while (this.#inflight > 0) {
      const head = r[RING_HEAD];
      if (head === Atomics.load(r, RING_TAIL)) break;
      const e = RING_EVENTS + head * (IO_EVENT_SIZE / 4);
      const slot = this.#slots[r[e]], res = r[e + 4] | 0; // res: an i64, < 2 GiB or -errno
      Atomics.store(r, RING_HEAD, head + 1 === this.#ringSize ? 0 : head + 1);
      this.#inflight--;
      count++;
      this.#finish(slot, res === slot.length ? 0 : res < 0 ? -res : EIO);
    }
    return count > 0;
  }

  /** Answers a request served here, and frees its slot. */
  #finish(slot: Slot, errno: number): void {
    const stats = slot.write ? this.#writeStats : this.#readStats;
    stats.end(slot.start, slot.length, errno !== 0);
    const v = slot.view, unique = v.getBigUint64(READ_AT + IN_HEADER.unique, true);
    // A READ's reply header goes just before its data; other replies at the slot's start.
    const withData = errno === 0 && !slot.write;
    const at = withData ? DATA - OUT_HEADER_SIZE : 0;
    const length = OUT_HEADER_SIZE + (errno !== 0 ? 0 : slot.write ? 8 : slot.length);
    v.setUint32(at, length, true);
    v.setInt32(at + 4, -errno, true);
    v.setBigUint64(at + 8, unique, true);
    if (errno === 0 && slot.write) v.setBigUint64(at + OUT_HEADER_SIZE, BigInt(slot.length), true);
    this.#reply(slot.bytes.subarray(at, at + length));
    this.#give(slot);
    this.#left();
  }

  #reply(bytes: Uint8Array<ArrayBuffer>): void {
    if (libc.write(this.#setup.fuseFd, bytes, BigInt(bytes.length)) >= 0) return;
    const errno = lastErrno();
    // ENOENT: the request was interrupted meanwhile; ENODEV: the connection is gone.
    if (errno !== ENOENT && errno !== ENODEV && errno !== ECONNABORTED) {
      throw new SysError(errno, "write", "/dev/fuse");
    }
  }

  /** A request of this thread's has left the fence (DirectAccess.hold waits for 0). */
  #left(): void {
    this.#owed--;
    if (Atomics.sub(this.#fence, FENCE.inflight, 1) === 1) {
      Atomics.notify(this.#fence, FENCE.inflight);
    }
  }

  /** Blocks until a request is queued (if a slot is free) or a completion has come. */
  #wait(): void {
    const completions = this.#completions.fd;
    let fired = false;
    if (!this.#gone && this.#free.length + this.#hugeFree.length > 0) {
      const n = this.#epoll.wait();
      for (let i = 0; i < n; i++) fired ||= this.#epoll.fdOf(i) === completions;
    } else {
      // Without a free slot the kernel keeps the queue: wait for completions alone.
      const p = this.#pollfds;
      p[1] = POLLIN; // events POLLIN, revents 0
      if (libc.poll(p, 1n, -1) < 0) {
        const errno = lastErrno();
        if (errno !== EINTR) throw new SysError(errno, "poll", "eventfd");
      }
      fired = (p[1] >>> 16) !== 0; // revents is the high half of the word
    }
    if (fired) libc.read(completions, this.#counter, 8n);
  }
}

self.onmessage = (event: MessageEvent<IoThreadSetup>): void => {
  let loop: IoLoop | null = null;
  try {
    loop = new IoLoop(event.data);
    loop.run();
    loop[Symbol.dispose]();
    post({ kind: "ended" });
  } catch (e) {
    try {
      loop?.[Symbol.dispose](); // io_destroy waits for the disk I/O in flight
    } catch { /* releasing what it holds is all that is left to do */ }
    post({ kind: "failed", message: (e as Error).message, lost: loop?.abandon() ?? false });
  }
  self.close();
};
