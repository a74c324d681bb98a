/**
 * Raw images: a regular file or a block device (a partition, a loop device), sector for sector.
 *   `aio`  — O_DIRECT, through libaio (default) or io_uring (`engine: "uring"`);
 *   `sync` — buffered pread/pwrite on the thread pool, for file systems without O_DIRECT.
 * Holes are found with SEEK_DATA/SEEK_HOLE; discard punches holes (BLKDISCARD on devices).
 */
import { FileHandle } from "../ffi/file.ts";
import { SysError } from "../ffi/errno.ts";
import {
  EINVAL,
  ENXIO,
  EOPNOTSUPP,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  O_DIRECT,
  O_RDONLY,
  O_RDWR,
  SEEK_DATA,
  SEEK_HOLE,
} from "../ffi/constants.ts";
import { sharedPool } from "../io/buffer_pool.ts";
import { type Buffers, byteLength, type EngineKind, type IoEngine } from "../io/engine.ts";
import { createEngine } from "../io/mod.ts";
import type { DiskDone, DiskImpl, DiskInfo, DiskOptions, Driver, Extent } from "./driver.ts";
import { DiskError } from "./errors.ts";
import { lockImageFile } from "./image_lock.ts";

/** Extents reported by one blockStatus call at most (each costs two lseeks). */
const MAX_EXTENTS = 1024;
const ZERO_CHUNK = 1024 * 1024;

/**
 * Opens an image file read-only or read-write, with O_DIRECT when `direct` (DiskOptions.direct),
 * and takes QEMU's image locks on it for as long as it is open (drivers/image_lock.ts); a writer
 * of a format that grows its file takes the resize permission too.
 */
export function openImageFile(
  path: string,
  options: DiskOptions,
  direct: boolean,
  size: "grows" | "fixed",
): FileHandle {
  const file = openFile(path, options, direct);
  try {
    lockImageFile(file, path, {
      readOnly: options.readOnly ?? false,
      forceShare: options.forceShare,
      grows: size === "grows",
    });
    return file;
  } catch (e) {
    file.close();
    throw e;
  }
}

function openFile(path: string, options: DiskOptions, direct: boolean): FileHandle {
  const flags = options.readOnly ? O_RDONLY : O_RDWR;
  if (!direct) return FileHandle.open(path, flags);
  try {
    return FileHandle.open(path, flags | O_DIRECT);
  } catch (e) {
    if (!(e instanceof SysError) || e.errno !== EINVAL) throw e;
    if (options.direct === "auto") return FileHandle.open(path, flags);
    throw new DiskError(
      "EINVAL",
      `Cannot open "${path}" with O_DIRECT: its file system does not support direct I/O ` +
        `(tmpfs?); use tap:sync:${path}, or direct=auto to fall back to buffered I/O`,
      { cause: e },
    );
  }
}

export class RawDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;
  readonly #blockDevice: boolean;
  /** Bytes of the file; reads past it (the partial last sector) return zeros. */
  readonly #fileSize: number;

  constructor(file: FileHandle, engine: IoEngine, readOnly: boolean) {
    const st = file.stat();
    this.#file = file;
    this.#engine = engine;
    this.#blockDevice = st.isBlockDevice;
    if (st.isBlockDevice) {
      const sectors = file.blockDeviceSectors();
      this.#fileSize = file.blockDeviceSize();
      this.info = {
        size: this.#fileSize - this.#fileSize % sectors.logical,
        logicalSectorSize: sectors.logical,
        physicalSectorSize: sectors.physical,
        readOnly,
        backing: null,
        discardFreesSpace: true,
      };
    } else if (st.isRegular) {
      this.#fileSize = st.size;
      this.info = {
        size: Math.ceil(st.size / 512) * 512,
        logicalSectorSize: 512,
        physicalSectorSize: 4096,
        readOnly,
        backing: null,
        discardFreesSpace: true,
      };
    } else {
      throw new DiskError("EINVAL", `"${file.path}" is neither a regular file nor a block device`);
    }
  }

  passthroughFile(): FileHandle | null {
    return this.#fileSize === this.info.size ? this.#file : null;
  }

  async read(offset: number, bufs: Buffers): Promise<void> {
    const got = await this.#engine.read(this.#file, offset, bufs);
    this.#checkRead(offset, bufs, got);
  }

  async write(offset: number, bufs: Buffers): Promise<void> {
    const got = await this.#engine.write(this.#file, offset, bufs);
    this.#checkWrite(offset, bufs, got);
  }

  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void {
    this.#engine.submit(write, this.#file, offset, bufs, (got) => {
      if (typeof got !== "number") return done(got);
      try {
        if (write) this.#checkWrite(offset, bufs, got);
        else this.#checkRead(offset, bufs, got);
      } catch (e) {
        return done(e as Error);
      }
      done(null);
    });
  }

  /** A short read is an error, except at the end of the file (a partial last sector: zeros). */
  #checkRead(offset: number, bufs: Buffers, got: number): void {
    const want = byteLength(bufs);
    if (got === want) return;
    if (offset + got < this.#fileSize) {
      throw new DiskError(
        "EIO",
        `read ${this.#file.path}: short read (${got} of ${want} bytes at ${offset})`,
      );
    }
    zeroFrom(bufs, got);
  }

  #checkWrite(offset: number, bufs: Buffers, got: number): void {
    const want = byteLength(bufs);
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

  async discard(offset: number, length: number): Promise<void> {
    try {
      if (this.#blockDevice) await this.#file.blockDiscard(offset, length);
      else {await this.#engine.fallocate(
          this.#file,
          FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
          offset,
          length,
        );}
    } catch (e) {
      // Discard is advisory: a file system or device without it keeps the data.
      if (!(e instanceof SysError && e.errno === EOPNOTSUPP)) throw e;
    }
  }

  async writeZeroes(offset: number, length: number, mayUnmap: boolean): Promise<void> {
    const mode = (mayUnmap && !this.#blockDevice ? FALLOC_FL_PUNCH_HOLE : FALLOC_FL_ZERO_RANGE) |
      FALLOC_FL_KEEP_SIZE;
    try {
      await this.#engine.fallocate(this.#file, mode, offset, length);
      return;
    } catch (e) {
      if (!(e instanceof SysError && (e.errno === EOPNOTSUPP || e.errno === EINVAL))) throw e;
    }
    const zeros = sharedPool.take(Math.min(length, ZERO_CHUNK));
    try {
      zeros.fill(0);
      for (let done = 0; done < length; done += zeros.length) {
        const n = Math.min(zeros.length, length - done);
        await this.write(offset + done, zeros.subarray(0, n));
      }
    } finally {
      sharedPool.give(zeros);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length;
    if (this.#blockDevice) return [{ offset, length, allocated: true, zero: false }];
    const extents: Extent[] = [];
    let pos = offset;
    while (pos < end && extents.length < MAX_EXTENTS) {
      const data = await this.#seek(pos, SEEK_DATA);
      if (data === null || data >= end) {
        extents.push({ offset: pos, length: end - pos, allocated: false, zero: true });
        break;
      }
      if (data > pos) {
        extents.push({ offset: pos, length: data - pos, allocated: false, zero: true });
      }
      const hole = Math.min((await this.#seek(data, SEEK_HOLE)) ?? end, end);
      extents.push({ offset: data, length: hole - data, allocated: true, zero: false });
      pos = hole;
    }
    return alignExtents(extents, this.info.logicalSectorSize);
  }

  /** lseek, with ENXIO (no data past this point) as null. */
  async #seek(pos: number, whence: number): Promise<number | null> {
    try {
      return await this.#file.seek(pos, whence);
    } catch (e) {
      if (e instanceof SysError && e.errno === ENXIO) return null;
      throw e;
    }
  }

  async close(): Promise<void> {
    try {
      await this.#engine.close();
    } finally {
      this.#file.close(); // and its image locks
    }
  }
}

/** File system extents are block-aligned except at end of file; keep boundaries on sectors. */
function alignExtents(extents: Extent[], sector: number): Extent[] {
  for (let i = 0; i + 1 < extents.length; i++) {
    const end = extents[i].offset + extents[i].length;
    const aligned = Math.ceil(end / sector) * sector;
    if (aligned !== end) {
      extents[i].length += aligned - end;
      extents[i + 1].offset = aligned;
      extents[i + 1].length -= aligned - end;
    }
  }
  return extents.filter((e) => e.length > 0);
}

function zeroFrom(bufs: Buffers, from: number): void {
  const list = bufs instanceof Uint8Array ? [bufs] : bufs;
  let pos = 0;
  for (const b of list) {
    if (pos + b.length > from) b.fill(0, Math.max(0, from - pos));
    pos += b.length;
  }
}

function rawDriver(type: "aio" | "sync", summary: string, defaultEngine: EngineKind): Driver {
  return {
    type,
    summary,
    open(path: string, options: DiskOptions): Promise<DiskImpl> {
      const wantDirect = options.direct === undefined ? type === "aio" : options.direct !== "off";
      const file = openImageFile(path, options, wantDirect, "fixed");
      let engine: IoEngine | undefined;
      try {
        engine = createEngine(options.engine ?? defaultEngine, {
          depth: options.depth,
          batch: options.batch,
          coalesceAbove: options.coalesceAbove,
          pollMicros: options.pollMicros,
        });
        return Promise.resolve(new RawDisk(file, engine, options.readOnly ?? false));
      } catch (e) {
        engine?.close();
        file.close();
        return Promise.reject(e);
      }
    },
  };
}

export const aioDriver: Driver = rawDriver(
  "aio",
  "raw file or block device, O_DIRECT, libaio or io_uring",
  "aio",
);
export const syncDriver: Driver = rawDriver(
  "sync",
  "raw file or block device, buffered pread/pwrite",
  "sync",
);
