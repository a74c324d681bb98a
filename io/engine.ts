/**
 * The I/O engine interface: asynchronous reads, writes, flushes and fallocate on open files.
 * Every operation queued during one event-loop turn goes to the kernel in one batch.
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

export interface IoEngine {
  readonly kind: EngineKind;
  /** Reads at `offset` into `bufs`; resolves with the bytes read (fewer only at end of file). */
  read(file: FileHandle, offset: number, bufs: Buffers): Promise<number>;
  /** Writes `bufs` at `offset`; resolves with the bytes written. */
  write(file: FileHandle, offset: number, bufs: Buffers): Promise<number>;
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
   * Kernel-queue engines: most requests per io_submit/io_uring_enter (default 1). Everything
   * prepared in one event-loop turn is submitted at the end of that turn, in calls of this size.
   */
  batch?: number;
}

/**
 * The submission batch for exports (`tapd serve`, `tapd tapdisk`): the FUSE export drains every
 * queued request at once, an NBD client pipelines, and there one io_submit per 16 requests gave
 * 10% more 4k IOPS than one per request (each call is a virtio kick, a VM exit).
 */
export const SERVER_BATCH = 16;
