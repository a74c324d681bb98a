/**
 * Dynamic and differencing VHDs, asynchronous (shared/specs/formats.md §4.5–§4.9). The BAT is
 * kept in memory; block bitmaps are cached, and a block whose bitmap is all ones is remembered
 * as full, so reads and overwrites of such blocks go straight to the I/O engine with no lock and
 * no lookup beyond the BAT. Allocating writes (and writes that set bitmap bits) are serialized
 * per block; BAT sector writes are serialized among themselves.
 *
 * Reads honour the bitmaps: a clear bit reads as zeros (dynamic) or from the parent
 * (differencing). New blocks of a dynamic disk get an all-ones bitmap as in QEMU (the rest of
 * the block is a hole past the old end of the file, so it reads as zeros); new blocks of a
 * differencing disk get the bits of the sectors written.
 *
 * Crash safety (kill -9 at any moment leaves a valid image with every flushed write in it):
 * 1. the footer is first moved past the new block (written at the new end, then fdatasync), so
 *    the file always ends with a valid footer, and the copy at offset 0 never changes;
 * 2. the block's bitmap and data are written into the space between;
 * 3. then the BAT entry that points at them.
 * A crash between steps leaves an unreferenced block (a leak `tapd check` reports), never an
 * entry pointing at unwritten space. For a partly covered sector-bitmap update, data is written
 * before the bits that expose it.
 */
import type { FileHandle } from "../../ffi/file.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { Buffers, IoEngine } from "../../io/engine.ts";
import type { Disk } from "../disk.ts";
import type { DiskImpl, DiskInfo, Extent } from "../driver.ts";
import { DiskError } from "../errors.ts";
import { L2Cache as BitmapCache, L2Table as Bitmap } from "../qcow/tables.ts";
import { allSet, bitSet, isFull, runLength, setBits } from "./bitmap.ts";
import { SECTOR, UNALLOCATED } from "./header.ts";
import type { VhdLayout } from "./layout.ts";
import { readScattered, settleAll, writeGathered } from "../scatter.ts";

const CACHE_BYTES = 32 * 1024 * 1024;
const MAX_EXTENTS = 1024;
const ZERO_CHUNK = 1024 * 1024;
/** Block data is aligned to this (or the block size) in the file, as blktap does. */
const DATA_ALIGN = 4096;

const alignUp = (x: number, a: number) => Math.ceil(x / a) * a;
const alignDown = (x: number, a: number) => Math.floor(x / a) * a;

const enum Src {
  Host,
  Base,
}

interface Piece {
  src: Src;
  /** Host offset (Host) or guest offset (Base). */
  at: number;
  tOff: number;
  len: number;
}

export class DynamicVhdDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly #path: string;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;
  readonly #bs: number;
  readonly #bitmapBytes: number;
  readonly #spb: number; // sectors per block
  readonly #bat: Uint32Array;
  readonly #batBytes: Uint8Array;
  readonly #batOffset: number;
  /** 1 where the block's bitmap is known to be all ones. */
  readonly #full: Uint8Array;
  readonly #cache: BitmapCache;
  readonly #parent: Disk | null;
  readonly #footer: Uint8Array;
  #end: number; // where the next block may start
  #footerAt: number; // where the end footer durably is (-1: none yet)
  #moving: Promise<void> = Promise.resolve();
  #batWrites: Promise<void> = Promise.resolve();
  readonly #locks = new Map<number, Promise<void>>();

  constructor(
    path: string,
    file: FileHandle,
    engine: IoEngine,
    layout: VhdLayout,
    parent: Disk | null,
    parentName: string | null,
    readOnly: boolean,
  ) {
    this.#path = path;
    this.#file = file;
    this.#engine = engine;
    this.#bs = layout.header!.blockSize;
    this.#bitmapBytes = layout.bitmapBytes;
    this.#spb = this.#bs / SECTOR;
    this.#bat = layout.bat;
    this.#batBytes = layout.batBytes.slice();
    this.#batOffset = layout.header!.tableOffset;
    this.#full = new Uint8Array(layout.bat.length);
    this.#cache = new BitmapCache(Math.floor(CACHE_BYTES / this.#bitmapBytes));
    this.#parent = parent;
    // The footer to keep at the end: the one in use, byte for byte (its checksum is right).
    this.#footer = layout.footerBytes.slice();
    this.#end = layout.freeStart;
    this.#footerAt = layout.endFooterOk ? layout.freeStart : -1;
    this.info = {
      size: layout.size,
      logicalSectorSize: SECTOR,
      physicalSectorSize: Math.min(this.#bs, 4096),
      readOnly,
      backing: parentName,
      discardFreesSpace: false,
    };
  }

  // ---- metadata ----

  async #writeExactly(offset: number, data: Uint8Array): Promise<void> {
    const n = await this.#engine.write(this.#file, offset, data);
    if (n !== data.length) {
      throw new DiskError("EIO", `write ${this.#path}: short write at ${offset}`);
    }
  }

  /** Writes metadata at any offset: sectors around an unaligned range are read and patched. */
  async #writeMeta(offset: number, data: Uint8Array): Promise<void> {
    const start = alignDown(offset, SECTOR), end = alignUp(offset + data.length, SECTOR);
    const buf = sharedPool.take(end - start);
    try {
      if (start !== offset || end !== offset + data.length) {
        const got = await this.#engine.read(this.#file, start, buf);
        if (got < buf.length) buf.fill(0, got);
      }
      buf.set(data, offset - start);
      await this.#writeExactly(start, buf);
    } finally {
      sharedPool.give(buf);
    }
  }

  /** A block's bitmap, from the cache or the file. */
  #bitmap(block: number): Bitmap | Promise<Bitmap> {
    const at = this.#bat[block] * SECTOR;
    return this.#cache.get(at, async () => {
      const buf = sharedPool.take(this.#bitmapBytes);
      try {
        const got = await this.#engine.read(this.#file, at, buf);
        if (got < buf.length) buf.fill(0, got);
        const bm = new Bitmap(at, buf.slice());
        if (isFull(bm.bytes, this.#spb)) this.#full[block] = 1;
        return bm;
      } finally {
        sharedPool.give(buf);
      }
    });
  }

  #dataAt(block: number): number {
    return this.#bat[block] * SECTOR + this.#bitmapBytes;
  }

  // ---- read ----

  read(offset: number, bufs: Buffers): Promise<void> {
    return readScattered(offset, bufs, (at, target) => this.#readInto(at, target));
  }

  /** Plans the whole read (bitmap loads may fail), then starts the I/O. */
  async #readInto(offset: number, target: Uint8Array): Promise<void> {
    const bs = this.#bs, end = offset + target.length, plan: Piece[] = [];
    const add = (src: Src, at: number, tOff: number, len: number) => {
      const last = plan[plan.length - 1];
      if (last?.src === src && last.at + last.len === at && last.tOff + last.len === tOff) {
        last.len += len;
      } else plan.push({ src, at, tOff, len });
    };
    for (let pos = offset; pos < end;) {
      const block = Math.floor(pos / bs), inOff = pos % bs;
      const len = Math.min(bs - inOff, end - pos), tOff = pos - offset;
      if (this.#bat[block] === UNALLOCATED) add(Src.Base, pos, tOff, len);
      else if (this.#full[block] === 1) add(Src.Host, this.#dataAt(block) + inOff, tOff, len);
      else {
        let bm = this.#bitmap(block);
        if (bm instanceof Promise) bm = await bm;
        const host = this.#dataAt(block);
        for (let s = inOff / SECTOR; s < (inOff + len) / SECTOR;) {
          const n = runLength(bm.bytes, s, (inOff + len) / SECTOR - s);
          const bytes = n * SECTOR, o = s * SECTOR;
          if (bitSet(bm.bytes, s)) add(Src.Host, host + o, tOff + o - inOff, bytes);
          else add(Src.Base, block * bs + o, tOff + o - inOff, bytes);
          s += n;
        }
      }
      pos += len;
    }
    await settleAll(plan.map((p) => {
      const sub = target.subarray(p.tOff, p.tOff + p.len);
      return p.src === Src.Host ? this.#hostRead(p.at, sub) : this.#readBase(p.at, sub);
    }));
  }

  async #hostRead(host: number, target: Uint8Array): Promise<void> {
    const got = await this.#engine.read(this.#file, host, target);
    if (got !== target.length) {
      throw new DiskError(
        "EIO",
        `read ${this.#path}: short read at ${host} (${got} of ${target.length})`,
      );
    }
  }

  /** What unallocated sectors read as: the parent's data, or zeros. */
  async #readBase(pos: number, target: Uint8Array): Promise<void> {
    const parent = this.#parent;
    const inParent = parent === null ? 0 : Math.max(0, Math.min(target.length, parent.size - pos));
    if (inParent < target.length) target.fill(0, inParent);
    if (inParent > 0) await parent!.read(pos, target.subarray(0, inParent));
  }

  // ---- write ----

  write(offset: number, bufs: Buffers): Promise<void> {
    return writeGathered(offset, bufs, (at, src) => this.#writeFrom(at, src));
  }

  #writeFrom(offset: number, src: Uint8Array): Promise<void> {
    const bs = this.#bs, end = offset + src.length, parts: Promise<void>[] = [];
    for (let pos = offset; pos < end;) {
      const block = Math.floor(pos / bs), stop = Math.min(end, (block + 1) * bs);
      parts.push(this.#writeInBlock(block, pos % bs, src.subarray(pos - offset, stop - offset)));
      pos = stop;
    }
    return settleAll(parts);
  }

  /** A write inside one block: in place when its sectors are all allocated, else locked. */
  async #writeInBlock(block: number, inOff: number, src: Uint8Array): Promise<void> {
    if (this.#bat[block] !== UNALLOCATED) {
      if (this.#full[block] === 1) return this.#writeExactly(this.#dataAt(block) + inOff, src);
      let bm = this.#bitmap(block);
      if (bm instanceof Promise) bm = await bm;
      if (allSet(bm.bytes, inOff / SECTOR, src.length / SECTOR)) {
        return this.#writeExactly(this.#dataAt(block) + inOff, src);
      }
    }
    return this.#locked(block, () => this.#lockedWrite(block, inOff, src));
  }

  /** Runs `fn` with the block's allocation lock held. */
  #locked<T>(block: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(block) ?? Promise.resolve();
    const run = prev.then(fn);
    const done = run.then(() => {}, () => {});
    this.#locks.set(block, done);
    done.then(() => {
      if (this.#locks.get(block) === done) this.#locks.delete(block);
    });
    return run;
  }

  async #lockedWrite(block: number, inOff: number, src: Uint8Array): Promise<void> {
    const first = inOff / SECTOR, count = src.length / SECTOR;
    if (this.#bat[block] === UNALLOCATED) return this.#allocateBlock(block, inOff, src);
    // Allocated meanwhile, or bits to set: the data first, then the bits that expose it.
    await this.#writeExactly(this.#dataAt(block) + inOff, src);
    if (this.#full[block] === 1) return;
    let bm = this.#bitmap(block);
    if (bm instanceof Promise) bm = await bm;
    if (allSet(bm.bytes, first, count)) return;
    setBits(bm.bytes, first, count);
    this.#cache.written(bm);
    const lo = alignDown(first >> 3, SECTOR), hi = alignUp((first + count + 7) >> 3, SECTOR);
    await this.#writeExactly(bm.offset + lo, bm.bytes.subarray(lo, Math.min(hi, bm.bytes.length)));
    if (isFull(bm.bytes, this.#spb)) this.#full[block] = 1;
  }

  /** A new block: footer moved past it, bitmap and data written, then the BAT entry. */
  async #allocateBlock(block: number, inOff: number, src: Uint8Array): Promise<void> {
    const at = await this.#reserve();
    const bm = new Bitmap(at, new Uint8Array(this.#bitmapBytes));
    const whole = inOff === 0 && src.length === this.#bs;
    if (this.#parent === null || whole) setBits(bm.bytes, 0, this.#spb);
    else setBits(bm.bytes, inOff / SECTOR, src.length / SECTOR);
    const data = at + this.#bitmapBytes;
    await settleAll([this.#writeExactly(at, bm.bytes), this.#writeExactly(data + inOff, src)]);
    await this.#setBat(block, at / SECTOR);
    // Bitmap and full flag first: a reader that sees the entry finds them.
    this.#cache.written(bm);
    if (isFull(bm.bytes, this.#spb)) this.#full[block] = 1;
    this.#bat[block] = at / SECTOR;
  }

  /**
   * Reserves a block's space (its data aligned to 4 KiB) and makes sure the footer lies past it
   * before resolving. Footer moves are serialized; each goes to the furthest reserved end.
   */
  #reserve(): Promise<number> {
    const bitmap = this.#bitmapBytes;
    const align = Math.min(DATA_ALIGN, this.#bs);
    const start = alignUp(this.#end + bitmap, align) - bitmap;
    this.#end = start + bitmap + this.#bs;
    const need = this.#end;
    const move = this.#moving.then(async () => {
      if (need <= this.#footerAt) return;
      const target = this.#end;
      await this.#writeExactly(target, this.#footer);
      await this.#engine.fsync(this.#file, true);
      this.#footerAt = target;
    });
    this.#moving = move.catch(() => {});
    return move.then(() => start);
  }

  /** Writes BAT entry `block`; BAT writes are serialized (entries share sectors). */
  #setBat(block: number, sector: number): Promise<void> {
    const run = this.#batWrites.then(() => {
      const v = new DataView(this.#batBytes.buffer, this.#batBytes.byteOffset);
      v.setUint32(block * 4, sector);
      const lo = alignDown(block * 4, SECTOR), hi = Math.min(lo + SECTOR, this.#batBytes.length);
      return this.#writeMeta(this.#batOffset + lo, this.#batBytes.subarray(lo, hi));
    });
    this.#batWrites = run.catch(() => {});
    return run;
  }

  flush(): Promise<void> {
    return this.#engine.fsync(this.#file, true);
  }

  // ---- zeroes, discard, block status ----

  /** Zeros read back; nothing is freed (blocks stay allocated). */
  async writeZeroes(offset: number, length: number): Promise<void> {
    const zeros = sharedPool.take(Math.min(length, ZERO_CHUNK));
    zeros.fill(0);
    try {
      for (let pos = offset; pos < offset + length;) {
        const n = Math.min(zeros.length, offset + length - pos);
        const extents = await this.blockStatus(pos, n);
        const parts: Promise<void>[] = [];
        let covered = 0;
        for (const e of extents) {
          if (!e.zero) parts.push(this.#writeFrom(e.offset, zeros.subarray(0, e.length)));
          covered += e.length;
        }
        await settleAll(parts);
        pos += covered;
      }
    } finally {
      sharedPool.give(zeros);
    }
  }

  discard(offset: number, length: number): Promise<void> {
    return this.writeZeroes(offset, length);
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const bs = this.#bs, end = offset + length, extents: Extent[] = [];
    const base = this.#parent === null;
    const add = (start: number, len: number, allocated: boolean) => {
      const zero = !allocated && base;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.allocated === allocated && last.zero === zero) {
        last.length += len;
      } else extents.push({ offset: start, length: len, allocated, zero });
    };
    for (let pos = offset; pos < end && extents.length < MAX_EXTENTS;) {
      const block = Math.floor(pos / bs), inOff = pos % bs;
      const len = Math.min(bs - inOff, end - pos);
      if (this.#bat[block] === UNALLOCATED) add(pos, len, false);
      else if (this.#full[block] === 1) add(pos, len, true);
      else {
        let bm = this.#bitmap(block);
        if (bm instanceof Promise) bm = await bm;
        for (let s = inOff / SECTOR; s < (inOff + len) / SECTOR;) {
          const n = runLength(bm.bytes, s, (inOff + len) / SECTOR - s);
          add(block * bs + s * SECTOR, n * SECTOR, bitSet(bm.bytes, s));
          s += n;
        }
      }
      pos += len;
    }
    return extents;
  }

  async close(): Promise<void> {
    try {
      await this.#moving;
      await this.#batWrites;
      await this.#engine.close();
    } finally {
      try {
        this.#file.close();
      } finally {
        await this.#parent?.close();
      }
    }
  }
}
