/**
 * `ram`: the image is loaded once into a named POSIX shared-memory object keyed by the image's
 * real path, so every tapd process that opens the same RAM image maps the same memory and sees
 * the others' writes at once.
 *
 * Lifetime and persistence policy:
 * - The first opener creates `/dev/shm/tapd-ram-<hash>` and loads the file into it; later openers
 *   map it. Each holds a shared flock on it while open; the last to close (the one that gets the
 *   exclusive lock) removes it. An object left by processes that died is reloaded from the file
 *   by the next opener (unflushed writes were never promised to survive).
 * - By default a RAM disk is volatile: writes live in memory only and `flush` has nothing to do;
 *   the image file is never written.
 * - With `persist` (`tap:ram:PATH,persist`), `flush` writes every dirty 64 KiB chunk (dirtied by any
 *   process) back to the file and fdatasyncs it, and closing a persistent disk flushes. The file
 *   keeps its size: bytes written into the partial last sector past its end are not stored.
 *
 * Layout of the shared object: a 4 KiB header (magic "TAPDRAM1", ready flag, size, image path),
 * a dirty bitmap (one bit per chunk, set with Atomics), then the image.
 */
import { FileHandle, shmOpen, shmUnlink } from "../ffi/file.ts";
import { libc } from "../ffi/libc.ts";
import { check, SysError } from "../ffi/errno.ts";
import { Mapping } from "../ffi/memory.ts";
import { LOCK_EX, LOCK_NB, LOCK_SH, O_CREAT, O_RDONLY, O_RDWR } from "../ffi/constants.ts";
import { createEngine } from "../io/mod.ts";
import type { Buffers } from "../io/engine.ts";
import type { DiskImpl, DiskInfo, DiskOptions, Driver, Extent } from "./driver.ts";
import { lockImageFile } from "./image_lock.ts";
import { DiskError } from "./errors.ts";

const MAGIC = "TAPDRAM1";
const HEADER = 4096;
const CHUNK_SHIFT = 16;
const CHUNK = 1 << CHUNK_SHIFT;
const PAGE = 4096;
const LOAD_CHUNK = 8 * 1024 * 1024;

/** The shared-memory object name for an image (FNV-1a of its real path). */
export function ramObjectName(realPath: string): string {
  let h = 0xcbf29ce484222325n;
  for (const b of new TextEncoder().encode(realPath)) {
    h = BigInt.asUintN(64, (h ^ BigInt(b)) * 0x100000001b3n);
  }
  return `/tapd-ram-${h.toString(16).padStart(16, "0")}`;
}

async function lock(shm: FileHandle, op: number): Promise<void> {
  const fd = shm.fd;
  // Waits on the thread pool; on failure a non-blocking retry on this thread learns the errno.
  if (await libc.flock_nb(fd, op) < 0) check(libc.flock(fd, op | LOCK_NB), "flock", shm.path);
}

function layout(size: number): { bitmapWords: number; dataOffset: number; total: number } {
  const chunks = Math.ceil(size / CHUNK);
  const bitmapWords = Math.ceil(chunks / 32);
  const dataOffset = HEADER + Math.ceil((bitmapWords * 4) / PAGE) * PAGE;
  return { bitmapWords, dataOffset, total: dataOffset + Math.max(size, PAGE) };
}

class RamDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly changedElsewhere = true;
  readonly #name: string;
  readonly #shm: FileHandle;
  readonly #map: Mapping;
  readonly #data: Uint8Array;
  readonly #dirty: Int32Array;
  readonly #image: FileHandle | null; // open only with persist
  readonly #fileSize: number;

  constructor(
    name: string,
    shm: FileHandle,
    map: Mapping,
    size: number,
    fileSize: number,
    image: FileHandle | null,
    readOnly: boolean,
  ) {
    const { bitmapWords, dataOffset } = layout(size);
    this.#name = name;
    this.#shm = shm;
    this.#map = map;
    this.#data = map.bytes.subarray(dataOffset, dataOffset + size);
    this.#dirty = new Int32Array(map.bytes.buffer, HEADER, bitmapWords);
    this.#image = image;
    this.#fileSize = fileSize;
    this.info = {
      size,
      logicalSectorSize: 512,
      physicalSectorSize: 4096,
      readOnly,
      backing: null,
      discardFreesSpace: false,
    };
  }

  read(offset: number, bufs: Buffers): Promise<void> {
    let pos = offset;
    for (const b of bufs instanceof Uint8Array ? [bufs] : bufs) {
      b.set(this.#data.subarray(pos, pos + b.length));
      pos += b.length;
    }
    return Promise.resolve();
  }

  write(offset: number, bufs: Buffers): Promise<void> {
    let pos = offset;
    for (const b of bufs instanceof Uint8Array ? [bufs] : bufs) {
      this.#data.set(b, pos);
      pos += b.length;
    }
    this.#markDirty(offset, pos - offset);
    return Promise.resolve();
  }

  async flush(): Promise<void> {
    if (this.#image !== null) await persist(this.#image, this.#data, this.#dirty, this.#fileSize);
  }

  discard(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    this.#data.fill(0, offset, offset + length);
    this.#markDirty(offset, length);
    return Promise.resolve();
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return Promise.resolve([{ offset, length, allocated: true, zero: false }]);
  }

  #markDirty(offset: number, length: number): void {
    const last = (offset + length - 1) >>> CHUNK_SHIFT;
    for (let c = offset >>> CHUNK_SHIFT; c <= last; c++) {
      Atomics.or(this.#dirty, c >>> 5, 1 << (c & 31));
    }
  }

  async close(): Promise<void> {
    const fd = this.#shm.fd;
    let last = false;
    try {
      if (this.#image !== null) await this.flush();
    } finally {
      last = libc.flock(fd, LOCK_EX | LOCK_NB) === 0;
      if (last) shmUnlink(this.#name);
      this.#map[Symbol.dispose]();
      this.#shm.close();
      this.#image?.close();
    }
  }
}

/** Writes the dirty chunks back to the image file and syncs it; bits are cleared before copying. */
async function persist(
  image: FileHandle,
  data: Uint8Array,
  dirty: Int32Array,
  fileSize: number,
): Promise<void> {
  const engine = createEngine("sync");
  try {
    const writes: Promise<number>[] = [];
    for (let w = 0; w < dirty.length; w++) {
      const bits = Atomics.exchange(dirty, w, 0);
      if (bits === 0) continue;
      for (let b = 0; b < 32; b++) {
        if ((bits & (1 << b)) === 0) continue;
        const start = (w * 32 + b) * CHUNK;
        const end = Math.min(start + CHUNK, fileSize);
        if (start >= end) continue;
        writes.push(
          engine.write(image, start, data.subarray(start, end)).catch((e) => {
            Atomics.or(dirty, w, 1 << b); // still dirty: the next flush retries
            throw e;
          }),
        );
      }
    }
    await Promise.all(writes);
    await engine.fsync(image, true);
  } finally {
    await engine.close();
  }
}

async function openRam(path: string, options: DiskOptions): Promise<DiskImpl> {
  const readOnly = options.readOnly ?? false;
  const persistent = (options.persist ?? false) && !readOnly;
  let realPath: string;
  try {
    realPath = Deno.realPathSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new SysError(2, "open", path);
    throw e;
  }
  const image = FileHandle.open(realPath, persistent ? O_RDWR : O_RDONLY);
  try {
    // Written back: a writer, sharing writing with the memory object's other users only.
    if (persistent) lockImageFile(image, path, { readOnly: false, sharesWrite: true });
    const st = image.stat();
    if (!st.isRegular) throw new DiskError("EINVAL", `RAM image "${path}" is not a regular file`);
    const fileSize = st.size;
    const size = Math.ceil(fileSize / 512) * 512;
    const name = ramObjectName(realPath);
    for (;;) {
      const shm = shmOpen(name, O_RDWR | O_CREAT);
      try {
        // The exclusive lock is free only when nobody uses the object: then we (re)load it.
        // Otherwise a shared lock waits for a loader to finish, and the object is ready.
        const alone = libc.flock(shm.fd, LOCK_EX | LOCK_NB) === 0;
        if (!alone) await lock(shm, LOCK_SH);
        if (linkCount(shm) === 0) { // removed by a last closer between our open and our lock
          shm.close();
          continue;
        }
        const { total } = layout(size);
        const shmSize = shm.stat().size;
        let map = shmSize === total ? new Mapping(shm.fd, total, { what: name }) : null;
        if (alone) {
          // Read while nothing else writes the file (until `image` closes, if not persistent).
          if (!persistent) lockImageFile(image, path, { readOnly: true });
          // Nobody uses the object: it is new, or left by a process that died (its creator while
          // loading, or a last user before removing it). Either way the file is the truth.
          map?.[Symbol.dispose]();
          shm.truncate(0); // drop any old contents, header and dirty bits
          shm.truncate(total);
          map = new Mapping(shm.fd, total, { what: name });
          await load(image, map.bytes.subarray(layout(size).dataOffset), fileSize);
          writeHeader(map.bytes, size, realPath);
        }
        if (map === null) {
          throw new DiskError(
            "EIO",
            `RAM image "${realPath}" changed size on disk while loaded in ${name}; close every user first`,
          );
        }
        checkHeader(map.bytes, size, realPath, name);
        if (alone) await lock(shm, LOCK_SH);
        return new RamDisk(name, shm, map, size, fileSize, persistent ? image : null, readOnly);
      } catch (e) {
        shm.close();
        throw e;
      }
    }
  } catch (e) {
    image.close();
    throw e;
  } finally {
    if (!persistent) image.close();
  }
}

function linkCount(file: FileHandle): number {
  const buf = new Uint8Array(144);
  check(libc.fstat(file.fd, buf), "fstat", file.path);
  return Number(new DataView(buf.buffer).getBigUint64(16, true));
}

async function load(image: FileHandle, into: Uint8Array, size: number): Promise<void> {
  const engine = createEngine("sync");
  try {
    const reads: Promise<number>[] = [];
    for (let off = 0; off < size; off += LOAD_CHUNK) {
      reads.push(engine.read(image, off, into.subarray(off, Math.min(off + LOAD_CHUNK, size))));
    }
    await Promise.all(reads);
  } finally {
    await engine.close();
  }
}

function writeHeader(mem: Uint8Array, size: number, realPath: string): void {
  const v = new DataView(mem.buffer, mem.byteOffset, HEADER);
  v.setBigUint64(16, BigInt(size), true);
  v.setUint32(24, CHUNK_SHIFT, true);
  const path = new TextEncoder().encode(realPath).subarray(0, HEADER - 65);
  mem.set(path, 64);
  mem.set(new TextEncoder().encode(MAGIC), 0); // last: marks the object complete
}

function checkHeader(mem: Uint8Array, size: number, realPath: string, name: string): void {
  const v = new DataView(mem.buffer, mem.byteOffset, HEADER);
  const magic = new TextDecoder().decode(mem.subarray(0, 8));
  const storedPath = new TextDecoder().decode(mem.subarray(64, HEADER)).replace(/\0.*$/s, "");
  if (magic !== MAGIC || storedPath !== realPath.slice(0, HEADER - 65)) {
    throw new DiskError(
      "EIO",
      `Shared memory object ${name} is not tapd's RAM image of "${realPath}"`,
    );
  }
  if (Number(v.getBigUint64(16, true)) !== size) {
    throw new DiskError(
      "EIO",
      `RAM image "${realPath}" changed size on disk while it is loaded in ${name}; close every user first`,
    );
  }
}

export const ramDriver: Driver = {
  type: "ram",
  summary: "image loaded into shared memory, visible to every tapd process that opens it",
  open: openRam,
};
