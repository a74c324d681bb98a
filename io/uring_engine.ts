/**
 * The io_uring engine: SQ and CQ rings mapped once and driven from TypeScript (no liburing
 * struct, no per-request FFI call); one io_uring_enter per batch; the eventfd registered on the
 * ring signals completions.
 */
import { checkNeg, SysError } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { EAGAIN, EINTR } from "../ffi/constants.ts";
import {
  CQE_SIZE,
  IORING_FSYNC_DATASYNC,
  IORING_OP_FALLOCATE,
  IORING_OP_FSYNC,
  IORING_OP_READ,
  IORING_OP_READV,
  IORING_OP_WRITE,
  IORING_OP_WRITEV,
  IORING_REGISTER_EVENTFD,
  liburing,
  PARAMS_SIZE,
  RingMaps,
  SQE_SIZE,
} from "../ffi/uring.ts";
import type { EngineOptions } from "./engine.ts";
import {
  OP_FALLOCATE,
  OP_FDSYNC,
  OP_FSYNC,
  OP_READ,
  OP_WRITE,
  type Prepared,
  QueueEngine,
} from "./queue_engine.ts";

const TWO32 = 0x100000000;
const EBUSY = 16;

export class UringEngine extends QueueEngine {
  readonly kind = "uring";
  protected readonly queuesFallocate = true;
  readonly #lib = liburing();
  readonly #ring: FileHandle;
  #rings: RingMaps | null = null;
  readonly #sq: Uint32Array; // over the SQ ring mapping
  readonly #sqHead: number; // word indexes into #sq
  readonly #sqTail: number;
  readonly #sqMask: number;
  readonly #sqArray: number;
  readonly #sqes: Uint32Array;
  readonly #cq: Uint32Array;
  readonly #cqHead: number;
  readonly #cqTail: number;
  readonly #cqMask: number;
  readonly #cqes: number;
  #tail = 0; // our SQ tail, published at submit

  constructor(options: EngineOptions = {}) {
    super(options);
    const lib = this.#lib;
    const params = new Uint32Array(PARAMS_SIZE / 4);
    const fd = checkNeg(lib.io_uring_setup(this.depth, params), "io_uring_setup");
    this.#ring = new FileHandle(fd, "io_uring");
    try {
      const r = this.#rings = new RingMaps(fd, params);
      this.#sq = r.sq;
      this.#sqHead = r.sqHead;
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
      const efd = new Int32Array([this.eventfd.fd]);
      checkNeg(lib.io_uring_register(fd, IORING_REGISTER_EVENTFD, efd, 1), "io_uring_register");
    } catch (e) {
      this.#release();
      throw e;
    }
  }

  protected prepare(slot: number, p: Prepared): void {
    const idx = this.#tail & this.#sqMask;
    const s = this.#sqes, i = idx * (SQE_SIZE / 4);
    let opcode: number, opFlags = 0;
    switch (p.op) {
      case OP_READ:
        opcode = p.vector ? IORING_OP_READV : IORING_OP_READ;
        break;
      case OP_WRITE:
        opcode = p.vector ? IORING_OP_WRITEV : IORING_OP_WRITE;
        break;
      case OP_FSYNC:
        opcode = IORING_OP_FSYNC;
        break;
      case OP_FDSYNC:
        opcode = IORING_OP_FSYNC;
        opFlags = IORING_FSYNC_DATASYNC;
        break;
      case OP_FALLOCATE:
        opcode = IORING_OP_FALLOCATE;
        break;
      default:
        throw new Error(`io_uring cannot queue operation ${p.op}`);
    }
    s[i] = opcode; // opcode u8, flags u8, ioprio u16: all zero but the opcode
    s[i + 1] = p.fd;
    s[i + 2] = p.offset % TWO32;
    s[i + 3] = Math.floor(p.offset / TWO32);
    s[i + 4] = p.addr % TWO32;
    s[i + 5] = Math.floor(p.addr / TWO32);
    s[i + 6] = p.len;
    s[i + 7] = opFlags;
    s[i + 8] = slot; // user_data
    s[i + 9] = 0;
    for (let k = 10; k < 16; k++) s[i + k] = 0;
    this.#sq[this.#sqArray + idx] = idx;
    this.#tail = (this.#tail + 1) >>> 0;
  }

  protected submitPrepared(count: number): number {
    Atomics.store(this.#sq, this.#sqTail, this.#tail);
    const rc = this.#lib.io_uring_enter(this.#ring.fd, count, 0, 0, null);
    if (rc >= 0) return rc;
    if (rc === -EAGAIN || rc === -EBUSY || rc === -EINTR) return 0;
    throw new SysError(-rc, "io_uring_enter");
  }

  protected reapOne(): boolean {
    const cq = this.#cq;
    const head = cq[this.#cqHead];
    if (head === Atomics.load(cq, this.#cqTail)) return false;
    const c = this.#cqes + (head & this.#cqMask) * (CQE_SIZE / 4);
    const slot = cq[c], res = cq[c + 2] | 0;
    Atomics.store(cq, this.#cqHead, (head + 1) >>> 0);
    this.complete(slot, res);
    return true;
  }

  protected takeUnsubmitted(): number[] {
    const head = Atomics.load(this.#sq, this.#sqHead);
    const slots: number[] = [];
    for (let t = head; t !== this.#tail; t = (t + 1) >>> 0) {
      slots.push(this.#sqes[(t & this.#sqMask) * (SQE_SIZE / 4) + 8]);
    }
    this.#tail = head;
    Atomics.store(this.#sq, this.#sqTail, head);
    return slots;
  }

  protected destroy(): void {
    this.#release();
  }

  #release(): void {
    this.#rings?.[Symbol.dispose]();
    this.#rings = null;
    this.#ring.close();
  }
}
