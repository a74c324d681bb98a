/**
 * io_uring through liburing 2.3's raw syscall wrappers (they return -errno, so they are safe to
 * call `nonblocking`). The rings themselves are mapped and driven in TypeScript (io/uring_engine.ts):
 * liburing's `struct io_uring` changes between releases and its prep helpers are header-only.
 * Layouts (x86-64):
 *   struct io_uring_params (120 bytes): sq_entries u32 @0, cq_entries @4, flags @8, features @20,
 *     sq_off @40 {head, tail, ring_mask, ring_entries, flags, dropped, array} (u32 each),
 *     cq_off @80 {head, tail, ring_mask, ring_entries, overflow, cqes} (u32 each)
 *   SQE (64 bytes): opcode u8 @0, flags u8 @1, fd i32 @4, off u64 @8, addr u64 @16, len u32 @24,
 *     op_flags u32 @28, user_data u64 @32
 *   CQE (16 bytes): user_data u64 @0, res i32 @8, flags u32 @12
 */

import { Mapping } from "./memory.ts";

const symbols = {
  io_uring_setup: {
    parameters: [
      "u32", // unsigned entries
      "buffer", // struct io_uring_params *p
    ],
    result: "i32",
  },
  io_uring_enter: {
    parameters: [
      "u32", // unsigned fd
      "u32", // unsigned to_submit
      "u32", // unsigned min_complete
      "u32", // unsigned flags
      "pointer", // sigset_t *sig
    ],
    result: "i32",
  },
  io_uring_register: {
    parameters: [
      "u32", // unsigned fd
      "u32", // unsigned opcode
      "buffer", // const void *arg
      "u32", // unsigned nr_args
    ],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

export const PARAMS_SIZE = 120;
export const SQE_SIZE = 64;
export const CQE_SIZE = 16;
export const IORING_OFF_SQ_RING = 0;
export const IORING_OFF_CQ_RING = 0x8000000;
export const IORING_OFF_SQES = 0x10000000;
export const IORING_FEAT_SINGLE_MMAP = 1;
export const IORING_ENTER_GETEVENTS = 1;
export const IORING_REGISTER_EVENTFD = 4;

export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
export const IORING_OP_FALLOCATE = 17;
export const IORING_OP_READ = 22;
export const IORING_OP_WRITE = 23;
export const IORING_OP_URING_CMD = 46;
export const IORING_FSYNC_DATASYNC = 1;
/** SQEs of 128 bytes: a URING_CMD's command area is 80 bytes (FUSE over io_uring needs it). */
export const IORING_SETUP_SQE128 = 1 << 10;
export const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
/** Completions' task work runs only when the ring's thread enters with GETEVENTS. */
export const IORING_SETUP_DEFER_TASKRUN = 1 << 13;

let lib: Deno.StaticForeignLibraryInterface<typeof symbols> | undefined;

/** liburing's raw wrappers, loaded on first use with an install hint when missing. */
export function liburing(): Deno.StaticForeignLibraryInterface<typeof symbols> {
  if (lib === undefined) {
    try {
      lib = Deno.dlopen(Deno.env.get("TAPD_LIBURING") ?? "liburing.so.2", symbols).symbols;
    } catch (e) {
      throw new Error("Cannot load liburing.so.2: install it with `apt-get install liburing2`", {
        cause: e,
      });
    }
  }
  return lib;
}

/**
 * An io_uring's SQ ring, SQE array and CQ ring, mapped once from its descriptor and the params
 * io_uring_setup filled in; the offsets are word indexes into `sq` and `cq`. `sqeSize` is 128
 * for a ring set up with IORING_SETUP_SQE128.
 */
export class RingMaps implements Disposable {
  readonly sq: Uint32Array;
  readonly sqHead: number;
  readonly sqTail: number;
  readonly sqMask: number;
  readonly sqArray: number;
  readonly sqes: Uint32Array;
  readonly cq: Uint32Array;
  readonly cqHead: number;
  readonly cqTail: number;
  readonly cqMask: number;
  /** Where the CQEs start. */
  readonly cqes: number;
  readonly #maps: Mapping[] = [];

  constructor(fd: number, params: Uint32Array, sqeSize = SQE_SIZE) {
    try {
      const sqEntries = params[0], cqEntries = params[1], features = params[5];
      const sqOff = 40 / 4, cqOff = 80 / 4;
      const sqSize = params[sqOff + 6] + sqEntries * 4;
      const cqSize = params[cqOff + 5] + cqEntries * CQE_SIZE;
      const map = (size: number, offset: number): Mapping => {
        const m = new Mapping(fd, size, { offset, what: "io_uring" });
        this.#maps.push(m);
        return m;
      };
      let sqMap: Mapping, cqMap: Mapping;
      if (features & IORING_FEAT_SINGLE_MMAP) {
        sqMap = cqMap = map(Math.max(sqSize, cqSize), IORING_OFF_SQ_RING);
      } else {
        sqMap = map(sqSize, IORING_OFF_SQ_RING);
        cqMap = map(cqSize, IORING_OFF_CQ_RING);
      }
      this.sqes = new Uint32Array(map(sqEntries * sqeSize, IORING_OFF_SQES).bytes.buffer);
      this.sq = new Uint32Array(sqMap.bytes.buffer);
      this.sqHead = params[sqOff] / 4;
      this.sqTail = params[sqOff + 1] / 4;
      this.sqMask = this.sq[params[sqOff + 2] / 4];
      this.sqArray = params[sqOff + 6] / 4;
      this.cq = new Uint32Array(cqMap.bytes.buffer);
      this.cqHead = params[cqOff] / 4;
      this.cqTail = params[cqOff + 1] / 4;
      this.cqMask = this.cq[params[cqOff + 2] / 4];
      this.cqes = params[cqOff + 5] / 4;
    } catch (e) {
      this[Symbol.dispose]();
      throw e;
    }
  }

  [Symbol.dispose](): void {
    for (const m of this.#maps) m[Symbol.dispose]();
    this.#maps.length = 0;
  }
}
