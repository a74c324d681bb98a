/**
 * The driver interface: tapd's "simple, asynchronous virtual disk interface".
 *
 * A driver turns an image (a raw file, a partition, a qcow file, a RAM image, …) into a disk.
 * `open(path, options)` resolves with a DiskImpl, a handful of callbacks. Drivers never validate
 * requests themselves: the Disk wrapper (drivers/disk.ts) checks alignment, range and
 * read-only before a callback is called, so every callback may assume
 *   - offset and total length are multiples of the logical sector size, length > 0,
 *   - offset + length ≤ info.size,
 *   - write/discard/writeZeroes are never called on a read-only disk.
 * Offsets and lengths are byte counts (plain numbers: exact up to 8 PiB).
 * Buffers are Uint8Arrays; views over BufferPool memory reach the kernel without a copy.
 * Errors are thrown as SysError (from the kernel) or DiskError (from the driver's own checks).
 */
import type { FileHandle } from "../ffi/file.ts";
import type { Buffers, EngineKind } from "../io/engine.ts";
import type { Disk } from "./disk.ts";

export type { Buffers };

/** Called once when a request started with `submit` ends: null, or why it failed. */
export type DiskDone = (error: Error | null) => void;

/** What an open disk is. */
export interface DiskInfo {
  /** Virtual size in bytes, a multiple of the logical sector size. */
  size: number;
  /** The unit of addressing and alignment for requests (512, or 4096 on 4Kn devices). */
  logicalSectorSize: number;
  /** The preferred I/O granularity (4096 for files). */
  physicalSectorSize: number;
  readOnly: boolean;
  /** The image this one reads through for unallocated data (copy-on-write), or null. */
  backing: string | null;
  /** False when discard is accepted but frees nothing. */
  discardFreesSpace: boolean;
}

/** A run of the disk with one allocation state. */
export interface Extent {
  offset: number;
  length: number;
  /** Backed by storage in this image (false: a hole, or data from the backing image). */
  allocated: boolean;
  /** Known to read as zeros. */
  zero: boolean;
}

/** The callbacks one open disk provides. */
export interface DiskImpl {
  readonly info: DiskInfo;
  /** Fills `bufs` (scatter-gather, in order) from `offset`. */
  read(offset: number, bufs: Buffers): Promise<void>;
  /** Writes `bufs` at `offset`. Acknowledged data is durable only after `flush`. */
  write(offset: number, bufs: Buffers): Promise<void>;
  /**
   * Optional: read (`write` false) or write in callback form, for drivers whose request path is
   * one engine call (the Disk wrapper falls back to read/write otherwise). `done` gets null or
   * the error, never from within the call itself.
   */
  submit?(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void;
  /** Makes every acknowledged write durable. */
  flush(): Promise<void>;
  /** Says the range is no longer needed (its contents become unspecified, usually zero). */
  discard(offset: number, length: number): Promise<void>;
  /** Makes the range read as zeros; `mayUnmap` allows freeing its storage. */
  writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void>;
  /**
   * Allocation map of a prefix of [offset, offset + length): contiguous extents starting at
   * `offset`, at least one, never past the range.
   */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Waits for requests in flight, releases everything. */
  close(): Promise<void>;
  /**
   * Optional: the open file that holds this disk byte for byte (a raw image whose size is the
   * disk's), so that an export may let the kernel read and write it directly (FUSE passthrough).
   * Drivers that map, cache or count their data leave it out.
   */
  passthroughFile?(): FileHandle | null;
  /**
   * True when other processes change the disk's data without passing through this open disk
   * (a shared RAM disk), so nothing read may be kept for later reads.
   */
  changedElsewhere?: boolean;
}

/** How to open a disk; drivers ignore what does not apply to them. */
export interface DiskOptions {
  readOnly?: boolean;
  /** I/O engine for file-backed drivers (aio: libaio by default). */
  engine?: EngineKind;
  /** O_DIRECT: "on" fails where unsupported, "auto" falls back to buffered I/O. */
  direct?: "on" | "off" | "auto";
  /**
   * Engine tuning for file-backed drivers: requests in flight, submission batch, coalescing,
   * polling (EngineOptions).
   */
  depth?: number;
  batch?: number;
  coalesceAbove?: number;
  pollMicros?: number;
  /** ram: write the RAM image back to its file on flush and on last close. */
  persist?: boolean;
  /**
   * Read-only: open the image even while another process writes it (qemu-img's -U), without
   * the image lock that keeps writers out (drivers/image_lock.ts).
   */
  forceShare?: boolean;
}

/** What a driver may ask of the registry while opening (it cannot import the registry). */
export interface OpenContext {
  /** Opens a backing image read-only, probing its format. */
  openBacking(path: string): Promise<Disk>;
}

/** A disk type: `tap:TYPE:PATH`. */
export interface Driver {
  readonly type: string;
  /** One line for `tapd help`. */
  readonly summary: string;
  open(path: string, options: DiskOptions, ctx: OpenContext): Promise<DiskImpl>;
}
