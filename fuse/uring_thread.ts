/**
 * The FUSE-over-io_uring thread (a Worker; fuse/uring.ts starts it). It registers ring entries
 * (a header area and a payload buffer each) on every queue of the connection with
 * FUSE_IO_URING_CMD_REGISTER; from then on the kernel delivers each request by completing one
 * entry's command, and takes the answer with FUSE_IO_URING_CMD_COMMIT_AND_FETCH, which also
 * waits for the entry's next request. The aligned, in-range READs and WRITEs of a raw image are
 * read or written straight from and into the entry's payload with io_uring READ and WRITE on
 * the image, so a request costs no system call of its own: one io_uring_enter submits the
 * batch's disk I/O and commits and waits for the next completions. Everything else is handed to
 * the main thread's session (a message), which writes its answer into the entry and asks for the
 * commit through shared memory and an eventfd, on which a READ stays queued here.
 */
/// <reference lib="deno.worker" />
import { FENCE, FENCE_OPEN } from "../drivers/direct_access.ts";
import { SysError } from "../ffi/errno.ts";
import { AlignedMemory, foreignMemory } from "../ffi/memory.ts";
import {
  CQE_SIZE,
  IORING_ENTER_GETEVENTS,
  IORING_OP_READ,
  IORING_OP_URING_CMD,
  IORING_OP_WRITE,
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SINGLE_ISSUER,
  IORING_SETUP_SQE128,
  liburing,
  PARAMS_SIZE,
  RingMaps,
} from "../ffi/uring.ts";
import { libc } from "../ffi/libc.ts";
import { OpStats, STATS_CELLS } from "../serve/stats.ts";
import { IN_HEADER, OP, OUT_HEADER_SIZE, RW_IN } from "./protocol.ts";
import { URING_HEADER, type UringMessage, type UringSetup } from "./uring_messages.ts";
import { failpoint } from "./failpoint.ts";

const EINTR = 4, EIO = 5, EAGAIN = 11, EBUSY = 16;
const FUSE_IO_URING_CMD_REGISTER = 1, FUSE_IO_URING_CMD_COMMIT_AND_FETCH = 2;
const SQE128_WORDS = 32;
/** user_data: the entry number, and what the operation was in the top byte. */
const TAG_CMD = 0, TAG_IO = 1 << 24, TAG_WAKE = 2 << 24, ENT_MASK = 0xffffff;
/** How long a failed thread waits for its disk I/O before it lets go of it anyway. */
const SETTLE_MS = 5000;
const TWO32 = 0x100000000;

/** Sizes of the operation headers (fuse_*_in), for requests whose header length is not set. */
const OP_IN_SIZE: Record<number, number> = {
  [OP.GETATTR]: 16,
  [OP.SETATTR]: 88,
  [OP.OPEN]: 8,
  [OP.READ]: RW_IN.size,
  [OP.WRITE]: RW_IN.size,
  [OP.RELEASE]: 24,
  [OP.FSYNC]: 16,
  [OP.FLUSH]: 24,
  [OP.FALLOCATE]: 32,
  [OP.LSEEK]: 24,
};

function post(message: UringMessage): void {
  self.postMessage(message);
}

/** One entry: its views, and the disk request it has at the image, if any. */
interface Entry {
  header: DataView;
  headerBytes: Uint8Array<ArrayBuffer>;
  payload: Uint8Array<ArrayBuffer>;
  payloadAddress: number;
  length: number;
  write: boolean;
  start: number;
}

class UringLoop implements Disposable {
  readonly #setup: UringSetup;
  readonly #lib = liburing();
  readonly #cleanup = new DisposableStack();
  readonly #ringFd: number;
  readonly #sq: Uint32Array;
  readonly #sqTail: number;
  readonly #sqMask: number;
  readonly #sqArray: number;
  readonly #sqes: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqMask: number;
  readonly #cqes: number;
  #tail = 0;
  #prepared = 0;
  readonly #entries: Entry[] = [];
  readonly #iovecs: BigUint64Array;
  readonly #iovecAddress: number;
  readonly #wakeBuffer = new BigUint64Array(1);
  readonly #wakeAddress: number;
  readonly #commits: Int32Array;
  readonly #fence: Int32Array;
  readonly #readStats: OpStats;
  readonly #writeStats: OpStats;
  /** Entries whose command is at the kernel (registered or committed), and disk I/O. */
  #live = 0;
  #io = 0;
  /** Requests counted into the fence and not yet answered. */
  #owed = 0;
  /** The entries are registered: the kernel sends this CPU's requests here alone. */
  #ready = false;
  /** TAPD_FAILPOINT=fuse-thread (tests): fail once a disk I/O is at the kernel. */
  readonly #failpoint = failpoint("fuse-thread");

  constructor(setup: UringSetup) {
    this.#setup = setup;
    this.#fence = new Int32Array(setup.fence);
    this.#commits = new Int32Array(setup.commits);
    const cells = (i: number) =>
      new Float64Array(setup.stats, setup.statsAt + i * STATS_CELLS * 8, STATS_CELLS);
    this.#readStats = new OpStats(cells(0));
    this.#writeStats = new OpStats(cells(1));
    const count = setup.entries;
    const depth = 1 << Math.ceil(Math.log2(count + 2));
    const params = new Uint32Array(PARAMS_SIZE / 4);
    // Completions are handled when this thread asks (its only thread): no interrupting task work.
    params[2] = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN;
    const fd = this.#lib.io_uring_setup(depth, params);
    if (fd < 0) throw new SysError(-fd, "io_uring_setup");
    this.#ringFd = fd;
    this.#cleanup.defer(() => libc.close(fd));
    const r = this.#cleanup.use(new RingMaps(fd, params, SQE128_WORDS * 4));
    this.#sq = r.sq;
    this.#sqTail = r.sqTail;
    this.#sqMask = r.sqMask;
    this.#sqArray = r.sqArray;
    this.#sqes = r.sqes;
    this.#cq = r.cq;
    this.#cqHead = r.cqHead;
    this.#cqTail = r.cqTail;
    this.#cqMask = r.cqMask;
    this.#cqes = r.cqes;
    this.#tail = this.#sq[this.#sqTail];

    // Each entry's two iovecs (header, payload), in one block the kernel reads at REGISTER.
    const control = this.#cleanup.use(new AlignedMemory(4096 + count * 32));
    this.#wakeAddress = control.address;
    this.#wakeBuffer = new BigUint64Array(control.bytes.buffer, 0, 1);
    this.#iovecAddress = control.address + 4096;
    this.#iovecs = new BigUint64Array(control.bytes.buffer, 4096, count * 4);
    const headers = foreignMemory(BigInt(setup.headers), count * URING_HEADER.stride);
    const payloads = foreignMemory(BigInt(setup.payloads), count * setup.payloadSize);
    for (let e = 0; e < count; e++) {
      const at = e * URING_HEADER.stride;
      this.#entries.push({
        header: new DataView(headers, at, URING_HEADER.size),
        headerBytes: new Uint8Array(headers, at, URING_HEADER.size),
        payload: new Uint8Array(payloads, e * setup.payloadSize, setup.payloadSize),
        payloadAddress: setup.payloads + e * setup.payloadSize,
        length: 0,
        write: false,
        start: -1,
      });
      this.#iovecs[e * 4] = BigInt(setup.headers + at);
      this.#iovecs[e * 4 + 1] = BigInt(URING_HEADER.size);
      this.#iovecs[e * 4 + 2] = BigInt(setup.payloads + e * setup.payloadSize);
      this.#iovecs[e * 4 + 3] = BigInt(setup.payloadSize);
    }
  }

  [Symbol.dispose](): void {
    this.#cleanup.dispose();
  }

  /**
   * After a failure, once disposed: takes the requests left unanswered out of the fence, so
   * that a pause or close does not wait for them. True once the entries were registered: from
   * then on the kernel waits for this queue's replies.
   */
  abandon(): boolean {
    while (this.#owed > 0) this.#left();
    return this.#ready;
  }

  /**
   * After a failure, before dispose: waits (a few seconds at most) for the disk I/O still at
   * the kernel, so that what abandon() releases is really done and the entries' memory is no
   * longer read or written. Nothing is answered: the connection is about to be aborted.
   */
  settle(): void {
    const cq = this.#cq, deadline = Date.now() + SETTLE_MS;
    while (this.#io > 0 && Date.now() < deadline) {
      const rc = this.#lib.io_uring_enter(this.#ringFd, 0, 1, IORING_ENTER_GETEVENTS, null);
      if (rc < 0 && rc !== -EINTR && rc !== -EAGAIN && rc !== -EBUSY) return;
      for (;;) {
        const head = cq[this.#cqHead];
        if (head === Atomics.load(cq, this.#cqTail)) break;
        const data = cq[this.#cqes + (head & this.#cqMask) * (CQE_SIZE / 4)];
        Atomics.store(cq, this.#cqHead, (head + 1) >>> 0);
        if ((data & ~ENT_MASK) === TAG_IO) this.#io--;
      }
    }
  }

  /** Registers the entries, then serves until the connection ends. */
  run(): void {
    // The kernel queues a request on the queue of the CPU it was made on: serve it there too
    // (best effort: the CPU may be outside this process's set).
    if (this.#setup.queue < 1024) {
      const mask = new BigUint64Array(16);
      mask[this.#setup.queue >> 6] = 1n << BigInt(this.#setup.queue & 63);
      libc.sched_setaffinity(0, 128n, mask);
    }
    for (let e = 0; e < this.#entries.length; e++) {
      this.#command(e, FUSE_IO_URING_CMD_REGISTER, 0n);
    }
    this.#armWake();
    this.#enter(0);
    const failed = this.#reap(true);
    if (failed !== 0) throw new SysError(failed, "io_uring FUSE_IO_URING_CMD_REGISTER");
    this.#ready = true;
    post({ kind: "ready" });
    while (this.#live > 0 || this.#io > 0) {
      this.#enter(1);
      this.#reap(false);
    }
  }

  /** Submits what is prepared and waits for `wait` completions (and the task work). */
  #enter(wait: number): void {
    Atomics.store(this.#sq, this.#sqTail, this.#tail);
    const submit = this.#prepared;
    const rc = this.#lib.io_uring_enter(this.#ringFd, submit, wait, IORING_ENTER_GETEVENTS, null);
    if (rc >= 0) {
      this.#prepared -= Math.min(rc, submit);
      if (this.#failpoint && this.#io > 0) {
        throw new Error("failpoint fuse-thread: failing with requests in flight");
      }
      return;
    }
    if (rc === -EINTR || rc === -EAGAIN || rc === -EBUSY) return;
    throw new SysError(-rc, "io_uring_enter");
  }

  /** The next SQE's words, cleared, with its opcode, descriptor and user_data. */
  #sqe(opcode: number, fd: number, data: number): number {
    const idx = this.#tail & this.#sqMask;
    const s = this.#sqes, i = idx * SQE128_WORDS;
    s.fill(0, i, i + SQE128_WORDS);
    s[i] = opcode;
    s[i + 1] = fd;
    s[i + 8] = data;
    this.#sq[this.#sqArray + idx] = idx;
    this.#tail = (this.#tail + 1) >>> 0;
    this.#prepared++;
    return i;
  }

  #command(e: number, op: number, commitId: bigint): void {
    const i = this.#sqe(IORING_OP_URING_CMD, this.#setup.fuseFd, TAG_CMD | e);
    const s = this.#sqes;
    s[i + 2] = op; // cmd_op
    if (op === FUSE_IO_URING_CMD_REGISTER) {
      const iov = this.#iovecAddress + e * 32;
      s[i + 4] = iov % TWO32;
      s[i + 5] = Math.floor(iov / TWO32);
      s[i + 6] = 2; // header and payload
    }
    // struct fuse_uring_cmd_req in the command area (byte 48): flags, commit_id, qid.
    s[i + 14] = Number(commitId & 0xffffffffn);
    s[i + 15] = Number(commitId >> 32n);
    s[i + 16] = this.#setup.queue;
    this.#live++;
  }

  #armWake(): void {
    const i = this.#sqe(IORING_OP_READ, this.#setup.wakeFd, TAG_WAKE);
    const s = this.#sqes;
    s[i + 4] = this.#wakeAddress % TWO32;
    s[i + 5] = Math.floor(this.#wakeAddress / TWO32);
    s[i + 6] = 8;
  }

  /**
   * Handles every completion at hand. With `registering`, returns the errno of a REGISTER that
   * failed at once (0 if none did).
   */
  #reap(registering: boolean): number {
    const cq = this.#cq;
    let failed = 0;
    for (;;) {
      const head = cq[this.#cqHead];
      if (head === Atomics.load(cq, this.#cqTail)) return failed;
      const c = this.#cqes + (head & this.#cqMask) * (CQE_SIZE / 4);
      const data = cq[c], res = cq[c + 2] | 0;
      Atomics.store(cq, this.#cqHead, (head + 1) >>> 0);
      const e = data & ENT_MASK;
      switch (data & ~ENT_MASK) {
        case TAG_CMD:
          this.#live--;
          if (res < 0) {
            if (registering && failed === 0) failed = -res;
          } else this.#request(e);
          break;
        case TAG_IO:
          this.#io--;
          this.#ioDone(e, res);
          break;
        case TAG_WAKE:
          this.#takeCommits();
          if (this.#live > 0) this.#armWake();
          break;
      }
    }
  }

  /** A request has arrived in entry `e`: serve it here or hand it over. */
  #request(e: number): void {
    const ent = this.#entries[e];
    const h = ent.header;
    const opcode = h.getUint32(IN_HEADER.opcode, true);
    const write = opcode === OP.WRITE;
    const { size, alignment, readOnly, imageFd } = this.#setup;
    if (opcode === OP.READ || (write && !readOnly)) {
      const offset = Number(h.getBigUint64(URING_HEADER.opIn + RW_IN.offset, true));
      const length = h.getUint32(URING_HEADER.opIn + RW_IN.length, true);
      const payloadSize = h.getUint32(URING_HEADER.payloadSize, true);
      if (
        length > 0 && ((offset | length) & (alignment - 1)) === 0 && offset + length <= size &&
        length <= this.#setup.payloadSize && (!write || payloadSize === length) && this.#admit()
      ) {
        ent.length = length;
        ent.write = write;
        ent.start = (write ? this.#writeStats : this.#readStats).start();
        const i = this.#sqe(write ? IORING_OP_WRITE : IORING_OP_READ, imageFd, TAG_IO | e);
        const s = this.#sqes;
        s[i + 2] = offset % TWO32;
        s[i + 3] = Math.floor(offset / TWO32);
        s[i + 4] = ent.payloadAddress % TWO32;
        s[i + 5] = Math.floor(ent.payloadAddress / TWO32);
        s[i + 6] = length;
        this.#io++;
        return;
      }
    }
    post({ kind: "request", ent: e, bytes: this.#assemble(ent, opcode) });
  }

  /** Counts a request into the fence; false (and not counted) when the disk is held. */
  #admit(): boolean {
    Atomics.add(this.#fence, FENCE.inflight, 1);
    this.#owed++;
    if (Atomics.load(this.#fence, FENCE.state) === FENCE_OPEN) return true;
    this.#left();
    return false;
  }

  #left(): void {
    this.#owed--;
    if (Atomics.sub(this.#fence, FENCE.inflight, 1) === 1) {
      Atomics.notify(this.#fence, FENCE.inflight);
    }
  }

  /** The request as /dev/fuse would have delivered it: header, operation header, payload. */
  #assemble(ent: Entry, opcode: number): Uint8Array<ArrayBuffer> {
    const h = ent.header;
    const payloadSize = Math.min(h.getUint32(URING_HEADER.payloadSize, true), ent.payload.length);
    const declared = h.getUint32(IN_HEADER.len, true) - IN_HEADER.size - payloadSize;
    const opSize = declared >= 0 && declared <= 128 ? declared : OP_IN_SIZE[opcode] ?? 0;
    const length = IN_HEADER.size + opSize + payloadSize;
    const bytes = new Uint8Array(length);
    bytes.set(ent.headerBytes.subarray(0, IN_HEADER.size));
    bytes.set(ent.headerBytes.subarray(URING_HEADER.opIn, URING_HEADER.opIn + opSize), 40);
    bytes.set(ent.payload.subarray(0, payloadSize), IN_HEADER.size + opSize);
    new DataView(bytes.buffer).setUint32(IN_HEADER.len, length, true);
    return bytes;
  }

  /** Entry `e`'s disk I/O has completed: answer it and fetch the next request. */
  #ioDone(e: number, res: number): void {
    const ent = this.#entries[e];
    const errno = res === ent.length ? 0 : res < 0 ? -res : EIO;
    (ent.write ? this.#writeStats : this.#readStats).end(ent.start, ent.length, errno !== 0);
    this.#left();
    const h = ent.header;
    const unique = h.getBigUint64(IN_HEADER.unique, true);
    let payload = 0;
    if (errno === 0) {
      if (ent.write) {
        new DataView(ent.payload.buffer, ent.payload.byteOffset, 8).setBigUint64(
          0,
          BigInt(ent.length),
          true,
        );
        payload = 8;
      } else payload = ent.length;
    }
    h.setUint32(0, OUT_HEADER_SIZE + payload, true);
    h.setInt32(4, -errno, true);
    h.setBigUint64(8, unique, true);
    h.setUint32(URING_HEADER.payloadSize, payload, true);
    this.#command(e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, unique);
  }

  /** Commits the entries the main thread has answered (their out header is in place). */
  #takeCommits(): void {
    const c = this.#commits, slots = c.length - 2;
    let taken = c[1];
    const written = Atomics.load(c, 0);
    while (taken !== written) {
      const e = c[2 + taken];
      taken = taken + 1 === slots ? 0 : taken + 1;
      const unique = this.#entries[e].header.getBigUint64(8, true);
      this.#command(e, FUSE_IO_URING_CMD_COMMIT_AND_FETCH, unique);
    }
    Atomics.store(c, 1, taken);
  }
}

self.onmessage = (event: MessageEvent<UringSetup>): void => {
  let loop: UringLoop | null = null;
  try {
    loop = new UringLoop(event.data);
    loop.run();
    loop[Symbol.dispose]();
    post({ kind: "ended" });
  } catch (e) {
    try {
      loop?.settle();
      loop?.[Symbol.dispose]();
    } catch { /* releasing what it holds is all that is left to do */ }
    post({ kind: "failed", message: (e as Error).message, lost: loop?.abandon() ?? false });
  }
  self.close();
};
