/**
 * libaio (Linux native AIO). Its wrappers return -errno, so they are safe to call `nonblocking`.
 * Structures are laid out by hand (x86-64, little-endian):
 *   struct iocb (64 bytes): data u64 @0, key u32 @8, rw_flags u32 @12, opcode u16 @16,
 *     reqprio i16 @18, fildes u32 @20, buf u64 @24, nbytes u64 @32, offset i64 @40,
 *     reserved2 u64 @48, flags u32 @56, resfd u32 @60
 *   struct io_event (32 bytes): data u64 @0, obj u64 @8, res i64 @16, res2 i64 @24
 */

const symbols = {
  io_setup: {
    parameters: [
      "i32", // int maxevents
      "buffer", // io_context_t *ctxp
    ],
    result: "i32",
  },
  io_destroy: { parameters: ["usize"], result: "i32" }, // io_context_t ctx
  io_submit: {
    parameters: [
      "usize", // io_context_t ctx
      "i64", // long nr
      "buffer", // struct iocb **iocbpp
    ],
    result: "i32",
  },
  io_getevents: {
    parameters: [
      "usize", // io_context_t ctx
      "i64", // long min_nr
      "i64", // long nr
      "buffer", // struct io_event *events
      "buffer", // struct timespec *timeout
    ],
    result: "i32",
  },
} as const satisfies Deno.ForeignLibraryInterface;

export const IOCB_SIZE = 64;
export const IO_EVENT_SIZE = 32;
export const IOCB_CMD_PREAD = 0;
export const IOCB_CMD_PWRITE = 1;
export const IOCB_CMD_FSYNC = 2;
export const IOCB_CMD_FDSYNC = 3;
export const IOCB_CMD_PREADV = 7;
export const IOCB_CMD_PWRITEV = 8;
/** iocb.flags bit: signal the eventfd in `resfd` on completion. */
export const IOCB_FLAG_RESFD = 1;

let lib: Deno.StaticForeignLibraryInterface<typeof symbols> | undefined;

/** libaio's symbols, loaded on first use with an install hint when the library is missing. */
export function libaio(): Deno.StaticForeignLibraryInterface<typeof symbols> {
  if (lib === undefined) {
    try {
      lib = Deno.dlopen(Deno.env.get("TAPD_LIBAIO") ?? "libaio.so.1", symbols).symbols;
    } catch (e) {
      throw new Error("Cannot load libaio.so.1: install it with `apt-get install libaio1`", {
        cause: e,
      });
    }
  }
  return lib;
}
