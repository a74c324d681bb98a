/**
 * The I/O engine interface: asynchronous reads, writes, flushes and fallocate on open files.
 * Every operation queued during one event-loop turn goes to the kernel in one batch.
 *
 * Buffers may be any Uint8Array. Views over registered foreign memory (BufferPool buffers,
 * mappings) go to the kernel as they are; other memory is copied through a pool buffer.
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
  /** Kernel-queue engines: µs to keep polling after a completion before sleeping (default 0). */
  pollMicros?: number;
  /** Kernel-queue engines: most requests per submission call. */
  batch?: number;
}
