/** The libaio engine: iocbs in one aligned slab, completions signalled on the engine's eventfd. */
import { checkNeg, SysError } from "../ffi/errno.ts";
import { AlignedMemory, foreignMemory } from "../ffi/memory.ts";
import {
  IO_EVENT_SIZE,
  IOCB_CMD_FDSYNC,
  IOCB_CMD_FSYNC,
  IOCB_CMD_PREAD,
  IOCB_CMD_PREADV,
  IOCB_CMD_PWRITE,
  IOCB_CMD_PWRITEV,
  IOCB_FLAG_RESFD,
  IOCB_SIZE,
  libaio,
} from "../ffi/aio.ts";
import { EAGAIN } from "../ffi/constants.ts";
import type { EngineOptions } from "./engine.ts";
import {
  OP_FDSYNC,
  OP_FSYNC,
  OP_READ,
  OP_WRITE,
  type Prepared,
  QueueEngine,
} from "./queue_engine.ts";

const TWO32 = 0x100000000;
const AIO_RING_MAGIC = 0xa10a10a1;
const RING_HEAD = 2, RING_TAIL = 3, RING_EVENTS = 8; // u32 word indexes

export class AioEngine extends QueueEngine {
  readonly kind = "aio";
  protected readonly queuesFallocate = false;
  readonly #lib = libaio();
  readonly #ctx: bigint;
  // One memory block: iocbs, then the iocb pointer array for io_submit.
  readonly #mem: AlignedMemory;
  readonly #words: Uint32Array;
  readonly #iocbs: number;
  readonly #ptrs: Uint8Array;
  readonly #ptrWords: number;
  /** The kernel's aio_ring as u32 words: header (id, nr, head, tail, magic, …), then io_events. */
  readonly #ring: Uint32Array;
  readonly #ringSize: number;
  /** Slots prepared and not yet submitted, in order. */
  #pending: number[] = [];

  constructor(options: EngineOptions = {}) {
    super(options);
    const lib = this.#lib;
    const ctxOut = new BigUint64Array(1);
    checkNeg(lib.io_setup(this.depth, ctxOut), "io_setup");
    this.#ctx = ctxOut[0];
    const header = new Uint32Array(foreignMemory(this.#ctx, 32));
    if (header[4] !== AIO_RING_MAGIC) {
      lib.io_destroy(this.#ctx);
      throw new Error("libaio: the kernel's completion ring has an unknown layout");
    }
    this.#ringSize = header[1];
    this.#ring = new Uint32Array(
      foreignMemory(this.#ctx, 32 + this.#ringSize * IO_EVENT_SIZE),
    );
    const iocbBytes = this.depth * IOCB_SIZE, ptrBytes = this.depth * 8;
    this.#mem = new AlignedMemory(iocbBytes + ptrBytes);
    this.#words = new Uint32Array(this.#mem.bytes.buffer);
    this.#iocbs = this.#mem.address;
    this.#ptrs = this.#mem.bytes.subarray(iocbBytes, iocbBytes + ptrBytes);
    this.#ptrWords = iocbBytes / 4;
  }

  protected prepare(slot: number, p: Prepared): void {
    const w = this.#words, i = slot * (IOCB_SIZE / 4);
    let opcode: number;
    switch (p.op) {
      case OP_READ:
        opcode = p.vector ? IOCB_CMD_PREADV : IOCB_CMD_PREAD;
        break;
      case OP_WRITE:
        opcode = p.vector ? IOCB_CMD_PWRITEV : IOCB_CMD_PWRITE;
        break;
      case OP_FSYNC:
        opcode = IOCB_CMD_FSYNC;
        break;
      case OP_FDSYNC:
        opcode = IOCB_CMD_FDSYNC;
        break;
      default:
        throw new Error(`libaio cannot queue operation ${p.op}`);
    }
    w[i] = slot; // aio_data
    w[i + 1] = 0;
    w[i + 2] = 0; // aio_key
    w[i + 3] = 0; // aio_rw_flags
    w[i + 4] = opcode; // aio_lio_opcode, aio_reqprio 0
    w[i + 5] = p.fd;
    w[i + 6] = p.addr % TWO32;
    w[i + 7] = Math.floor(p.addr / TWO32);
    w[i + 8] = p.len;
    w[i + 9] = 0;
    w[i + 10] = p.offset % TWO32;
    w[i + 11] = Math.floor(p.offset / TWO32);
    w[i + 12] = 0;
    w[i + 13] = 0;
    w[i + 14] = IOCB_FLAG_RESFD;
    w[i + 15] = this.eventfd.fd;
    this.#pending.push(slot);
  }

  protected submitPrepared(count: number): number {
    const w = this.#words, failed: number[] = [];
    let done = 0;
    while (done < count) {
      const n = count - done;
      for (let k = 0; k < n; k++) {
        const addr = this.#iocbs + this.#pending[done + k] * IOCB_SIZE;
        w[this.#ptrWords + 2 * k] = addr % TWO32;
        w[this.#ptrWords + 2 * k + 1] = Math.floor(addr / TWO32);
      }
      const rc = this.#lib.io_submit(this.#ctx, BigInt(n), this.#ptrs);
      if (rc > 0) {
        done += rc;
      } else if (rc === 0 || rc === -EAGAIN) {
        break; // the kernel is out of request slots: retried when completions free some
      } else {
        // io_submit refused the batch's first iocb (bad fd, bad alignment, unsupported op).
        failed.push(this.#pending[done], rc);
        done++;
      }
    }
    this.#pending.splice(0, done);
    for (let k = 0; k < failed.length; k += 2) this.complete(failed[k], failed[k + 1]);
    return done;
  }

  protected reapOne(): boolean {
    // Completions are read straight from the kernel's completion ring (mapped at the context's
    // address), as fio's userspace_reap does: no system call per reap.
    const r = this.#ring;
    const head = r[RING_HEAD];
    if (head === Atomics.load(r, RING_TAIL)) return false;
    const e = RING_EVENTS + head * (IO_EVENT_SIZE / 4);
    // res is an i64; transfers are < 2 GiB, so its low word read as i32 is the value or -errno.
    const slot = r[e], res = r[e + 4] | 0;
    Atomics.store(r, RING_HEAD, head + 1 === this.#ringSize ? 0 : head + 1);
    this.complete(slot, res);
    return true;
  }

  protected takeUnsubmitted(): number[] {
    const slots = this.#pending;
    this.#pending = [];
    return slots;
  }

  protected destroy(): void {
    const rc = this.#lib.io_destroy(this.#ctx);
    this.#mem[Symbol.dispose]();
    if (rc < 0) throw new SysError(-rc, "io_destroy");
  }
}
