/**
 * BlockTarget: what an export (NBD, the blkif ring, FUSE) serves. A Disk is one; so is a
 * DiskGate (serve/gate.ts), which adds pause, resume-on-a-new-image and statistics in front.
 */
import type { FileHandle } from "../ffi/file.ts";
import type { DirectAccess } from "./direct_access.ts";
import type { Buffers } from "../io/engine.ts";
import type { DiskDone, DiskInfo, Extent } from "./driver.ts";

export interface BlockTarget {
  readonly info: DiskInfo;
  readonly size: number;
  /** The spec it was opened from, for messages. */
  readonly name: string;
  read(offset: number, bufs: Buffers): Promise<void>;
  write(offset: number, bufs: Buffers): Promise<void>;
  /**
   * Optional: a read served at once from memory the target holds (DiskGate's read-ahead), as
   * views handed to `use`, which must be done with them when it returns; false when it cannot.
   */
  readInPlace?(offset: number, length: number, use: (parts: Uint8Array[]) => void): boolean;
  /** read (`write` false) or write in callback form: the request path of the ring and FUSE. */
  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void;
  flush(): Promise<void>;
  discard(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number, options?: { mayUnmap?: boolean }): Promise<void>;
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /**
   * Optional: the file that holds the disk byte for byte (Disk.passthroughFile), for FUSE
   * passthrough. I/O through it never reaches this target: a front that pauses or counts
   * requests (DiskGate) must refuse to pause while a passthrough export is mounted.
   */
  passthroughFile?(): FileHandle | null;
  /**
   * Optional: a caller of passthroughFile() no longer does I/O through it (the kernel refused
   * passthrough, or the export ended); once per passthroughFile() that returned a file.
   */
  passthroughReturned?(): void;
  /**
   * Optional: the raw disk's file lent to I/O threads (drivers/direct_access.ts), or null when
   * the disk is mapped. The caller disposes it once its threads have ended (or it is not used
   * after all); a front that pauses or counts (DiskGate) holds and counts the threads' requests
   * through it until then.
   */
  directAccess?(): DirectAccess | null;
}
