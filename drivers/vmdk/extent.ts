/**
 * What the VMDK disk asks of one extent (a sparse file, a flat file, or a ZERO extent), and the
 * plumbing the extents share: metadata I/O through pool memory and waiting for every part of a
 * request.
 */
import type { FileHandle } from "../../ffi/file.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { IoEngine } from "../../io/engine.ts";
import { DiskError } from "../errors.ts";

export const SECTOR = 512;

export const alignUp = (x: number, a: number) => Math.ceil(x / a) * a;
export const alignDown = (x: number, a: number) => Math.floor(x / a) * a;

/** Reads what an extent does not hold (the parent disk, or zeros) at an extent-local offset. */
export type BaseReader = (offset: number, target: Uint8Array) => Promise<void>;

/** The state of a run of an extent. */
export const enum Alloc {
  /** Not in this image: the parent, or zeros. */
  Unallocated,
  /** Reads as zeros without consulting the parent (zeroed-grain entry, ZERO extent). */
  Zero,
  /** Data stored in this image. */
  Data,
}

export interface ExtentRun {
  length: number;
  state: Alloc;
}

export interface VmdkExtent {
  /** Bytes of the virtual disk this extent holds. */
  readonly size: number;
  readonly writable: boolean;
  read(offset: number, target: Uint8Array, base: BaseReader): Promise<void>;
  write(offset: number, src: Uint8Array, base: BaseReader): Promise<void>;
  /** Frees whole grains of [offset, offset + length) when it can (no parent). */
  discard(offset: number, length: number): Promise<void>;
  /** A prefix of [offset, offset + length) with one state. */
  status(offset: number, length: number): Promise<ExtentRun>;
  flush(): Promise<void>;
  close(): Promise<void>;
}

export { settleAll } from "../scatter.ts";

/** Reads `length` bytes at any `offset` through an aligned pool buffer; past the end reads 0. */
export async function readMeta(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  length: number,
): Promise<Uint8Array<ArrayBuffer>> {
  const start = alignDown(offset, SECTOR), end = alignUp(offset + length, SECTOR);
  const buf = sharedPool.take(end - start);
  try {
    const got = await engine.read(file, start, buf);
    if (got < end - start) buf.fill(0, Math.max(0, got));
    return buf.slice(offset - start, offset - start + length);
  } finally {
    sharedPool.give(buf);
  }
}

/** Writes all of `data` at `offset`, or fails with EIO. */
export async function writeExactly(
  engine: IoEngine,
  file: FileHandle,
  path: string,
  offset: number,
  data: Uint8Array,
): Promise<void> {
  const n = await engine.write(file, offset, data);
  if (n !== data.length) throw new DiskError("EIO", `write ${path}: short write at ${offset}`);
}

/** Reads `target.length` bytes at `offset`; bytes past the end of the file read as zeros. */
export async function readData(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  target: Uint8Array,
): Promise<void> {
  const got = await engine.read(file, offset, target);
  if (got < target.length) target.fill(0, Math.max(0, got));
}
