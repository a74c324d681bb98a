/**
 * A hosted sparse extent (monolithicSparse, a twoGbMaxExtentSparse piece, a streamOptimized
 * file): grain directory in memory, grain tables cached (qcow's L2Cache), reads and overwrites of
 * allocated grains straight to the engine, allocation serialized per grain table.
 *
 * Crash safety (kill -9 at any moment leaves an image that opens and holds every acknowledged
 * write; leaked grains at worst, never an entry pointing at unwritten data):
 * - the file is extended (ftruncate + fdatasync) before new space is used;
 * - a grain's data is written before the GT entry that points at it, the primary GT before the
 *   redundant GT; a new GT (both copies) before the GD entries (primary, then redundant).
 * Compressed (streamOptimized) extents are read-only.
 */
import { inflateSync } from "node:zlib";
import type { FileHandle } from "../../ffi/file.ts";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from "../../ffi/constants.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { IoEngine } from "../../io/engine.ts";
import { DiskError, ImageError } from "../errors.ts";
import { L2Cache, L2Table } from "../qcow/tables.ts";
import {
  alignDown,
  alignUp,
  Alloc,
  type BaseReader,
  type ExtentRun,
  readData,
  readMeta,
  SECTOR,
  settleAll,
  type VmdkExtent,
  writeExactly,
} from "./extent.ts";
import {
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_RGD,
  FLAG_ZEROED_GRAIN,
  gdSectors,
  gtBytes,
  gtCount,
  MAX_SECTOR_ENTRY,
  parseMarker,
  type SparseHeader,
} from "./header.ts";

const GROW_STEP = 8 * 1024 * 1024;
const CACHE_BYTES = 32 * 1024 * 1024;
const INFLATED_CACHE = 16;

/** One piece of a read plan: host data, base (parent/zeros), zeros, or a compressed grain. */
interface Piece {
  state: Alloc | "compressed";
  /** Host offset (data), extent offset (base), or offset inside the grain (compressed). */
  at: number;
  tOff: number;
  len: number;
  /** Compressed: the grain's host offset. */
  grain: number;
}

export class SparseExtent implements VmdkExtent {
  readonly size: number;
  readonly writable: boolean;
  readonly h: SparseHeader;
  readonly #path: string;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;
  readonly #grain: number;
  readonly #gtSpan: number;
  readonly #gtBytes: number;
  readonly #gd: Uint32Array;
  readonly #rgd: Uint32Array | null;
  readonly #gdRegion: Uint8Array;
  readonly #rgdRegion: Uint8Array | null;
  readonly #cache: L2Cache;
  readonly #compressed: boolean;
  readonly #zeroedGrains: boolean;
  readonly #hasParent: boolean;
  readonly #openedSize: number;
  readonly #inflated = new Map<number, Uint8Array>();
  #end: number;
  #fileSize: number;
  #growing: Promise<void> = Promise.resolve();
  #gdWrites: Promise<void> = Promise.resolve();
  readonly #locks = new Map<number, Promise<void>>();

  constructor(
    path: string,
    file: FileHandle,
    engine: IoEngine,
    h: SparseHeader,
    sectors: number,
    gdRegion: Uint8Array,
    rgdRegion: Uint8Array | null,
    fileSize: number,
    writable: boolean,
    hasParent: boolean,
  ) {
    this.#path = path;
    this.#file = file;
    this.#engine = engine;
    this.h = h;
    this.size = sectors * SECTOR;
    this.#grain = h.grainSectors * SECTOR;
    this.#gtSpan = this.#grain * h.gtesPerGt;
    this.#gtBytes = gtBytes(h);
    this.#compressed = (h.flags & FLAG_COMPRESSED) !== 0;
    this.#zeroedGrains = (h.flags & FLAG_ZEROED_GRAIN) !== 0;
    this.#hasParent = hasParent;
    this.writable = writable && !this.#compressed;
    const n = gtCount(h);
    this.#gdRegion = gdRegion;
    this.#rgdRegion = rgdRegion;
    this.#gd = decodeGd(gdRegion, n);
    this.#rgd = rgdRegion === null ? null : decodeGd(rgdRegion, n);
    checkGd(path, "grain directory", this.#gd, this.#gtBytes, fileSize);
    if (this.#rgd !== null) {
      checkGd(path, "redundant grain directory", this.#rgd, this.#gtBytes, fileSize);
    }
    this.#cache = new L2Cache(Math.floor(CACHE_BYTES / this.#gtBytes));
    this.#end = this.#fileSize = this.#openedSize = fileSize;
  }

  // ---- lookups ----

  #table(gdi: number): L2Table | null | Promise<L2Table> {
    const sector = this.#gd[gdi];
    if (sector === 0) return null;
    const off = sector * SECTOR;
    return this.#cache.get(
      off,
      async () => new L2Table(off, await readMeta(this.#engine, this.#file, off, this.#gtBytes)),
    );
  }

  async #tableAt(gdi: number): Promise<L2Table | null> {
    const t = this.#table(gdi);
    return t instanceof Promise ? await t : t;
  }

  #entry(table: L2Table | null, gti: number): number {
    return table === null ? 0 : table.view.getUint32(gti * 4, true);
  }

  #state(entry: number): Alloc | "compressed" {
    if (entry === 0) return Alloc.Unallocated;
    if (entry === 1 && this.#zeroedGrains) return Alloc.Zero;
    return this.#compressed ? "compressed" : Alloc.Data;
  }

  /** A data grain's host offset, checked against the file. */
  #host(entry: number, pos: number): number {
    const host = entry * SECTOR;
    if (host >= this.#fileSize || entry < 1) {
      throw new DiskError(
        "EIO",
        `${this.#path}: corrupt image: the grain for offset ${pos} points outside the file (sector ${entry})`,
      );
    }
    return host;
  }

  // ---- read ----

  async read(offset: number, target: Uint8Array, base: BaseReader): Promise<void> {
    const g = this.#grain, end = offset + target.length, plan: Piece[] = [];
    for (let pos = offset; pos < end;) {
      const gdi = Math.floor(pos / this.#gtSpan);
      let table = this.#table(gdi); // no await on the hot path when the table is cached
      if (table instanceof Promise) table = await table;
      const inOff = pos % g, len = Math.min(g - inOff, end - pos), tOff = pos - offset;
      const entry = this.#entry(table, Math.floor(pos / g) % this.h.gtesPerGt);
      const state = this.#state(entry), last = plan[plan.length - 1];
      if (state === Alloc.Data) {
        const host = this.#host(entry, pos) + inOff;
        if (last?.state === Alloc.Data && last.at + last.len === host) last.len += len;
        else plan.push({ state, at: host, tOff, len, grain: 0 });
      } else if (state === "compressed") {
        plan.push({ state, at: inOff, tOff, len, grain: this.#host(entry, pos) });
      } else if (last?.state === state && last.tOff + last.len === tOff) last.len += len;
      else plan.push({ state, at: pos, tOff, len, grain: 0 });
      pos += len;
    }
    await settleAll(plan.map((p) => {
      const sub = target.subarray(p.tOff, p.tOff + p.len);
      if (p.state === Alloc.Data) return readData(this.#engine, this.#file, p.at, sub);
      if (p.state === Alloc.Unallocated) return base(p.at, sub);
      if (p.state === Alloc.Zero) {
        sub.fill(0);
        return Promise.resolve();
      }
      return this.#inflate(p.grain).then((grain) => sub.set(grain.subarray(p.at, p.at + p.len)));
    }));
  }

  /** A compressed grain (zlib stream, after a 12-byte marker when the extent has markers). */
  async #inflate(host: number): Promise<Uint8Array> {
    const hit = this.#inflated.get(host);
    if (hit !== undefined) return hit;
    const g = this.#grain,
      corrupt = (why: string, cause?: unknown) =>
        new DiskError("EIO", `${this.#path}: compressed grain at ${host}: ${why}`, { cause });
    let data: Uint8Array;
    if ((this.h.flags & FLAG_MARKERS) !== 0) {
      const head = await readMeta(this.#engine, this.#file, host, SECTOR);
      const m = parseMarker(head);
      if (m.size === 0 || m.size > 2 * g + 1024 || host + 12 + m.size > this.#fileSize) {
        throw corrupt(`bad grain marker (size ${m.size})`);
      }
      data = 12 + m.size <= SECTOR
        ? head.subarray(12, 12 + m.size)
        : (await readMeta(this.#engine, this.#file, host, 12 + m.size)).subarray(12);
    } else {
      data = await readMeta(this.#engine, this.#file, host, Math.min(2 * g, this.#fileSize - host));
    }
    let out: Uint8Array;
    try {
      out = inflateSync(data, { finishFlush: 2 /* Z_SYNC_FLUSH: tolerate a cut stream */ });
    } catch (e) {
      throw corrupt("does not inflate", e);
    }
    if (out.length < g) {
      // Only the grain the capacity ends in may be short: the rest reads as zeros.
      const padded = new Uint8Array(g);
      padded.set(out);
      out = padded;
    }
    out = out.subarray(0, g);
    this.#inflated.set(host, out);
    if (this.#inflated.size > INFLATED_CACHE) {
      this.#inflated.delete(this.#inflated.keys().next().value!);
    }
    return out;
  }

  // ---- write ----

  write(offset: number, src: Uint8Array, base: BaseReader): Promise<void> {
    const end = offset + src.length, parts: Promise<void>[] = [];
    for (let pos = offset; pos < end;) {
      const gdi = Math.floor(pos / this.#gtSpan);
      const stop = Math.min(end, (gdi + 1) * this.#gtSpan);
      parts.push(this.#writeInTable(gdi, pos, src.subarray(pos - offset, stop - offset), base));
      pos = stop;
    }
    return settleAll(parts);
  }

  async #writeInTable(
    gdi: number,
    offset: number,
    src: Uint8Array,
    base: BaseReader,
  ): Promise<void> {
    let table = this.#table(gdi);
    if (table instanceof Promise) table = await table;
    if (table !== null) {
      const direct = this.#directWrites(table, offset, src);
      if (direct !== null) return direct;
    }
    return this.#locked(gdi, () => this.#allocatingWrite(gdi, offset, src, base));
  }

  /** Writes in place when every grain is allocated; null when one is not. */
  #directWrites(table: L2Table, offset: number, src: Uint8Array): Promise<void> | null {
    const g = this.#grain, end = offset + src.length, runs: number[] = [];
    for (let pos = offset; pos < end;) {
      const entry = this.#entry(table, Math.floor(pos / g) % this.h.gtesPerGt);
      if (this.#state(entry) !== Alloc.Data) return null;
      const inOff = pos % g, len = Math.min(g - inOff, end - pos);
      let host: number;
      try {
        host = this.#host(entry, pos) + inOff;
      } catch (e) {
        return Promise.reject(e);
      }
      const n = runs.length;
      if (n > 0 && runs[n - 3] + runs[n - 1] === host) runs[n - 1] += len;
      else runs.push(host, pos - offset, len);
      pos += len;
    }
    const tasks: Promise<void>[] = [];
    for (let k = 0; k < runs.length; k += 3) {
      const piece = src.subarray(runs[k + 1], runs[k + 1] + runs[k + 2]);
      tasks.push(writeExactly(this.#engine, this.#file, this.#path, runs[k], piece));
    }
    return settleAll(tasks);
  }

  #locked<T>(gdi: number, fn: () => Promise<T>): Promise<T> {
    const prev = this.#locks.get(gdi) ?? Promise.resolve();
    const run = prev.then(fn);
    const done = run.then(() => {}, () => {});
    this.#locks.set(gdi, done);
    done.then(() => {
      if (this.#locks.get(gdi) === done) this.#locks.delete(gdi);
    });
    return run;
  }

  async #allocatingWrite(
    gdi: number,
    offset: number,
    src: Uint8Array,
    base: BaseReader,
  ): Promise<void> {
    const g = this.#grain, end = offset + src.length;
    const table = await this.#tableAt(gdi);
    const direct: { host: number; piece: Uint8Array }[] = [];
    const fresh: { gti: number; data: Uint8Array<ArrayBuffer> }[] = [];
    try {
      for (let pos = offset; pos < end;) {
        const inOff = pos % g, len = Math.min(g - inOff, end - pos);
        const gti = Math.floor(pos / g) % this.h.gtesPerGt;
        const entry = this.#entry(table, gti), state = this.#state(entry);
        const piece = src.subarray(pos - offset, pos - offset + len);
        if (state === Alloc.Data) direct.push({ host: this.#host(entry, pos) + inOff, piece });
        else {
          // A new grain: what the write does not cover is what the grain read as before.
          const data = sharedPool.take(g);
          fresh.push({ gti, data });
          if (len < g) {
            const start = pos - inOff;
            data.fill(0);
            if (state === Alloc.Unallocated) {
              await base(start, data.subarray(0, Math.min(g, this.size - start)));
            }
          }
          data.set(piece, inOff);
        }
        pos += len;
      }
      const writes: Promise<unknown>[] = direct.map((d) =>
        writeExactly(this.#engine, this.#file, this.#path, d.host, d.piece)
      );
      if (fresh.length > 0) writes.push(this.#commitGrains(gdi, table, fresh));
      await settleAll(writes);
    } finally {
      for (const f of fresh) sharedPool.give(f.data);
    }
  }

  /** Grain data first, then the GT entries (primary, then redundant), or a new GT, then the GD. */
  async #commitGrains(
    gdi: number,
    table: L2Table | null,
    fresh: { gti: number; data: Uint8Array }[],
  ): Promise<void> {
    const g = this.#grain;
    const base = await this.#allocate(fresh.length * g, g);
    await settleAll(
      fresh.map((f, k) => writeExactly(this.#engine, this.#file, this.#path, base + k * g, f.data)),
    );
    if (table === null) {
      const at = await this.#allocate(this.#gtBytes * (this.#rgd === null ? 1 : 2), SECTOR);
      const created = new L2Table(at, new Uint8Array(this.#gtBytes));
      fresh.forEach((f, k) => created.view.setUint32(f.gti * 4, (base + k * g) / SECTOR, true));
      await writeExactly(this.#engine, this.#file, this.#path, at, created.bytes);
      if (this.#rgd !== null) {
        await writeExactly(this.#engine, this.#file, this.#path, at + this.#gtBytes, created.bytes);
      }
      this.#cache.written(created);
      await this.#setGd(gdi, at / SECTOR, this.#rgd === null ? 0 : (at + this.#gtBytes) / SECTOR);
      return;
    }
    // The entries go to disk from a copy of their sectors, and into the cached table only once
    // written: a concurrent writer cannot see (and acknowledge data in) a grain whose entry
    // is not yet in the file.
    let lo = Infinity, hi = -Infinity;
    for (const f of fresh) {
      lo = Math.min(lo, f.gti * 4);
      hi = Math.max(hi, f.gti * 4 + 4);
    }
    const start = alignDown(lo, SECTOR), end = Math.min(alignUp(hi, SECTOR), table.bytes.length);
    const copy = table.bytes.slice(start, end), cv = new DataView(copy.buffer);
    fresh.forEach((f, k) => cv.setUint32(f.gti * 4 - start, (base + k * g) / SECTOR, true));
    await this.#writeGtSectors(gdi, table.offset, start, copy);
    table.bytes.set(copy, start);
    this.#cache.written(table);
  }

  /** Writes GT sectors at byte `start` of a table, to the primary GT then the redundant one. */
  async #writeGtSectors(gdi: number, at: number, start: number, bytes: Uint8Array): Promise<void> {
    await writeExactly(this.#engine, this.#file, this.#path, at + start, bytes);
    const r = this.#rgd?.[gdi] ?? 0;
    if (r !== 0) {
      await writeExactly(this.#engine, this.#file, this.#path, r * SECTOR + start, bytes);
    }
  }

  /** Writes the sectors of `table` holding bytes [lo, hi) (primary, then redundant). */
  #writeGtBytes(gdi: number, table: L2Table, lo: number, hi: number): Promise<void> {
    const start = alignDown(lo, SECTOR), end = Math.min(alignUp(hi, SECTOR), table.bytes.length);
    return this.#writeGtSectors(gdi, table.offset, start, table.bytes.subarray(start, end));
  }

  /**
   * Points GD entry `gdi` (and the redundant one) at new tables, in memory only once the primary
   * entry is written. GD sector writes are serialized (entries share sectors).
   */
  #setGd(gdi: number, sector: number, redundant: number): Promise<void> {
    const run = this.#gdWrites.then(async () => {
      const at = gdi * 4, start = alignDown(at, SECTOR);
      const write = async (region: Uint8Array, gdOffset: number, value: number) => {
        const copy = region.slice(start, Math.min(start + SECTOR, region.length));
        new DataView(copy.buffer).setUint32(at - start, value, true);
        await writeExactly(this.#engine, this.#file, this.#path, gdOffset * SECTOR + start, copy);
        region.set(copy, start);
      };
      await write(this.#gdRegion, this.h.gdOffset, sector);
      this.#gd[gdi] = sector;
      if (this.#rgd !== null && this.#rgdRegion !== null && redundant !== 0) {
        await write(this.#rgdRegion, this.h.rgdOffset, redundant);
        this.#rgd[gdi] = redundant;
      }
    });
    this.#gdWrites = run.catch(() => {});
    return run;
  }

  /** Reserves `bytes` at the `align`-aligned end of the file, growing the file durably first. */
  #allocate(bytes: number, align: number): Promise<number> {
    const start = alignUp(this.#end, align);
    if ((start + bytes) / SECTOR > MAX_SECTOR_ENTRY) {
      return Promise.reject(
        new DiskError("ENOSPC", `${this.#path}: sparse extent full (32-bit sector numbers)`),
      );
    }
    this.#end = start + bytes;
    const need = this.#end;
    if (need <= this.#fileSize) return Promise.resolve(start);
    const grow = this.#growing.then(async () => {
      if (need <= this.#fileSize) return;
      const size = Math.max(need, alignUp(this.#fileSize + GROW_STEP, this.#grain));
      this.#file.truncate(size);
      await this.#engine.fsync(this.#file, true);
      this.#fileSize = size;
    });
    this.#growing = grow.catch(() => {});
    return grow.then(() => start);
  }

  // ---- discard, status ----

  async discard(offset: number, length: number): Promise<void> {
    if (this.#hasParent || !this.writable) return; // unmapping would expose the parent
    const g = this.#grain, first = alignUp(offset, g), last = alignDown(offset + length, g);
    const parts: Promise<void>[] = [];
    for (let pos = first; pos < last;) {
      const gdi = Math.floor(pos / this.#gtSpan);
      const stop = Math.min(last, (gdi + 1) * this.#gtSpan), from = pos;
      parts.push(this.#locked(gdi, () => this.#unmap(gdi, from, stop)));
      pos = stop;
    }
    await settleAll(parts);
  }

  async #unmap(gdi: number, from: number, to: number): Promise<void> {
    const table = await this.#tableAt(gdi);
    if (table === null) return;
    const g = this.#grain, freed: number[] = [];
    let lo = Infinity, hi = -Infinity;
    for (let pos = from; pos < to; pos += g) {
      const gti = Math.floor(pos / g) % this.h.gtesPerGt, entry = this.#entry(table, gti);
      if (entry === 0) continue;
      if (this.#state(entry) === Alloc.Data) freed.push(entry * SECTOR);
      table.view.setUint32(gti * 4, 0, true);
      lo = Math.min(lo, gti * 4);
      hi = Math.max(hi, gti * 4 + 4);
    }
    if (lo === Infinity) return;
    this.#cache.written(table);
    await this.#writeGtBytes(gdi, table, lo, hi);
    await Promise.all(
      freed.map((host) =>
        this.#engine.fallocate(this.#file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, g)
          .catch(() => {})
      ),
    );
  }

  async status(offset: number, length: number): Promise<ExtentRun> {
    const g = this.#grain, end = offset + length;
    let state: Alloc | null = null, pos = offset;
    while (pos < end) {
      const gdi = Math.floor(pos / this.#gtSpan);
      const table = await this.#tableAt(gdi);
      const len = table === null
        ? Math.min((gdi + 1) * this.#gtSpan, end) - pos
        : Math.min(g - pos % g, end - pos);
      const s = this.#state(this.#entry(table, Math.floor(pos / g) % this.h.gtesPerGt));
      const here = s === "compressed" ? Alloc.Data : s;
      if (state === null) state = here;
      else if (state !== here) break;
      pos += len;
      if (pos - offset >= 64 * this.#gtSpan) break; // enough for one answer
    }
    return { length: pos - offset, state: state! };
  }

  flush(): Promise<void> {
    return this.#engine.fsync(this.#file, true);
  }

  async close(): Promise<void> {
    try {
      await this.#growing;
      if (this.writable && this.#fileSize > this.#openedSize) {
        const used = Math.max(this.#end, this.#openedSize);
        if (used < this.#fileSize) this.#file.truncate(used);
      }
    } finally {
      this.#file.close();
    }
  }
}

/** Refuses a GD with an entry whose grain table is not inside the file. */
function checkGd(path: string, name: string, gd: Uint32Array, gtBytes: number, fileSize: number) {
  for (let i = 0; i < gd.length; i++) {
    if (gd[i] !== 0 && gd[i] * SECTOR + gtBytes > fileSize) {
      throw new ImageError(path, `${name} entry ${i} points outside the file (sector ${gd[i]})`);
    }
  }
}

function decodeGd(region: Uint8Array, n: number): Uint32Array {
  const v = new DataView(region.buffer, region.byteOffset, region.length);
  const gd = new Uint32Array(n);
  for (let i = 0; i < n; i++) gd[i] = v.getUint32(i * 4, true);
  return gd;
}

/** Bytes of the GD region for `h` (whole sectors). */
export function gdRegionBytes(h: SparseHeader): number {
  return gdSectors(h) * SECTOR;
}

/** Whether the header says a redundant GD is kept. */
export function hasRedundantGd(h: SparseHeader): boolean {
  return (h.flags & FLAG_RGD) !== 0 && h.rgdOffset !== 0;
}
