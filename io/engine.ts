/**
 * The I/O engine interface: asynchronous reads, writes, flushes and fallocate on open files.
 * Operations go to the kernel in batches: a batch as soon as it is full (and a large read or
 * write at once, with what was prepared before it), the rest at the end of the event-loop turn
 * that queued them.
 *
 * Buffers may be any Uint8Array. Views over registered foreign memory (BufferPool buffers,
 * mappings) whose address and length are multiples of 512 (what O_DIRECT needs) go to the kernel
 * as they are; other memory is copied through a pool buffer.
 */
import type { FileHandle } from "../ffi/file.ts";

export type EngineKind = "aio" | "uring" | "sync";
export const ENGINE_KINDS: readonly EngineKind[] = ["aio", "uring", "sync"];

/** One buffer or a scatter-gather list, filled or drained in order. */
export type Buffers = Uint8Array | readonly Uint8Array[];

/**
 * Called once when an operation started with `submit` ends: the bytes transferred, or the
 * error. Never called from within `submit` itself, and must not throw.
 */
export type IoDone = (result: number | Error) => void;

export interface IoEngine {
  readonly kind: EngineKind;
  /** Reads at `offset` into `bufs`; resolves with the bytes read (fewer only at end of file). */
  read(file: FileHandle, offset: number, bufs: Buffers): Promise<number>;
  /** Writes `bufs` at `offset`; resolves with the bytes written. */
  write(file: FileHandle, offset: number, bufs: Buffers): Promise<number>;
  /**
   * read/write in callback form, for request paths where the promises of the calls above (and of
   * every layer awaiting them) cost more than the request itself.
   */
  submit(write: boolean, file: FileHandle, offset: number, bufs: Buffers, done: IoDone): void;
  /** fsync, or fdatasync when `dataOnly`. */
  fsync(file: FileHandle, dataOnly: boolean): Promise<void>;
  /** fallocate(2): punch holes, zero ranges, preallocate. */
  fallocate(file: FileHandle, mode: number, offset: number, length: number): Promise<void>;
  /** Waits for every operation in flight, then frees the engine. Idempotent. */
  close(): Promise<void>;
}

/** Total byte length of a buffer list. */
export function byteLength(bufs: Buffers): number {
  if (bufs instanceof Uint8Array) return bufs.length;
  let n = 0;
  for (const b of bufs) n += b.length;
  return n;
}

/** Options common to the engines. */
export interface EngineOptions {
  /** Operations in flight at once (default 256); more wait in a queue. */
  depth?: number;
  /**
   * Kernel-queue engines: µs to keep looking for completions after the last one (or the last
   * submission) before parking on the eventfd (default 0); the looks are microtask hops with an
   * event-loop turn every so often (io/poll_window.ts). Trades CPU for latency.
   */
  pollMicros?: number;
  /**
   * Kernel-queue engines: most requests per io_submit/io_uring_enter (default 1). A full batch is
   * submitted as soon as it is prepared (within submit()); a partial one at the end of the
   * event-loop turn.
   */
  batch?: number;
  /**
   * Kernel-queue engines: while at least this many requests are at the kernel, new ones are held
   * until `batch` of them are ready or the engine has handed out the completions at hand (it
   * submits when it next finds the completion queue empty), so that they go to the kernel in
   * fewer, larger calls. Default 0: never held.
   */
  coalesceAbove?: number;
}

/**
 * The submission batch for exports (`tapd serve`, `tapd tapdisk`): the FUSE export drains every
 * queued request at once, an NBD client pipelines, and there one io_submit per 16 requests gave
 * 10% more 4k IOPS than one per request (each call is a virtio kick, a VM exit).
 */
export const SERVER_BATCH = 16;

/**
 * Submission coalescing for exports (EngineOptions.coalesceAbove). A FUSE export's requests
 * arrive a few at a time, so they went to the kernel ~4 per io_submit; each call notifies the
 * virtio disk, a VM exit that cost ~8 µs here (perf: 18% of tapd's time in `iowrite16`). Held
 * while 32 are in flight, fio's 4k random I/O through a loop device on the FUSE file rose from
 * 0.50–0.57× to 0.57–0.66× of the same loop device on the raw file (docs/performance.md). The
 * ring (~7 per call already) and QD below 32 are unaffected.
 */
export const SERVER_COALESCE = 32;

/** The engine tuning every export opens its disk with. */
export const SERVER_ENGINE: Readonly<EngineOptions> = {
  batch: SERVER_BATCH,
  coalesceAbove: SERVER_COALESCE,
};

/**
 * The submission batch for a disk served on blkif rings only (`tapd tapdisk --ring`/`--xen`,
 * `tapd xen-backend`). A ring hands its requests over in bursts (a frontend woken with a burst
 * of responses publishes as many requests), and each full batch goes to the kernel as soon as it
 * is prepared, so a small batch gets the burst's first requests to the disk soonest: random 4k
 * reads through the ring, paired, 0.77× of fio with 4 against 0.74× with 16 (both ends polling:
 * 0.97× against 0.89×). FUSE measured the other way round (4k random reads 0.63× with 16, 0.61×
 * with 4), so a disk with other exports keeps SERVER_BATCH.
 */
export const RING_BATCH = 4;

/** The engine tuning of a disk served on blkif rings only. */
export const RING_ENGINE: Readonly<EngineOptions> = {
  batch: RING_BATCH,
  coalesceAbove: SERVER_COALESCE,
};
