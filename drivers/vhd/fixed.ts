/**
 * Fixed VHDs (shared/specs/formats.md §4.1): the disk's bytes, then the footer. Requests go
 * straight to the I/O engine at the same offsets; the footer is never written.
 */
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
} from "../../ffi/constants.ts";
import { SysError } from "../../ffi/errno.ts";
import type { FileHandle } from "../../ffi/file.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { type Buffers, byteLength, type IoEngine } from "../../io/engine.ts";
import type { DiskImpl, DiskInfo, Extent } from "../driver.ts";
import { DiskError } from "../errors.ts";
import { SECTOR } from "./header.ts";

const ZERO_CHUNK = 1024 * 1024;

export class FixedVhdDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;

  constructor(file: FileHandle, engine: IoEngine, size: number, readOnly: boolean) {
    this.#file = file;
    this.#engine = engine;
    this.info = {
      size,
      logicalSectorSize: SECTOR,
      physicalSectorSize: 4096,
      readOnly,
      backing: null,
      discardFreesSpace: true,
    };
  }

  async read(offset: number, bufs: Buffers): Promise<void> {
    const want = byteLength(bufs);
    const got = await this.#engine.read(this.#file, offset, bufs);
    if (got !== want) {
      throw new DiskError(
        "EIO",
        `read ${this.#file.path}: short read (${got} of ${want} bytes at ${offset})`,
      );
    }
  }

  async write(offset: number, bufs: Buffers): Promise<void> {
    const want = byteLength(bufs);
    const got = await this.#engine.write(this.#file, offset, bufs);
    if (got !== want) {
      throw new DiskError(
        "EIO",
        `write ${this.#file.path}: short write (${got} of ${want} bytes at ${offset})`,
      );
    }
  }

  flush(): Promise<void> {
    return this.#engine.fsync(this.#file, true);
  }

  /** Punches a hole (the range then reads as zeros); the footer is past every request. */
  discard(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length, true);
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    const mode = (mayUnmap ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) | FALLOC_FL_KEEP_SIZE;
    try {
      await this.#engine.fallocate(this.#file, mode, offset, length);
      return;
    } catch (e) {
      if (!(e instanceof SysError)) throw e;
    }
    const zeros = sharedPool.take(Math.min(length, ZERO_CHUNK));
    try {
      zeros.fill(0);
      for (let done = 0; done < length; done += zeros.length) {
        await this.write(offset + done, zeros.subarray(0, Math.min(zeros.length, length - done)));
      }
    } finally {
      sharedPool.give(zeros);
    }
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ offset, length, allocated: true, zero: false }]);
  }

  async close(): Promise<void> {
    try {
      await this.#engine.close();
    } finally {
      this.#file.close();
    }
  }
}
