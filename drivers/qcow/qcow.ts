/**
 * `qcow`: QEMU's qcow version 1, asynchronous. Reads and overwrites of allocated clusters go
 * straight to the I/O engine with no lock; L2 tables are cached. An allocating write claims its
 * new clusters (other writes to those clusters wait; writes elsewhere, in the same table too, go
 * on), writes them with one gathered write at the end of the file, and hands their entries to the
 * table's group commit (table_commits.ts), which writes each table once for everything queued
 * while its previous write was in flight. Format: shared/specs/formats.md §1.
 *
 * Crash safety (kill -9 at any moment leaves an image whose acknowledged writes all read back;
 * power loss, one whose flushed writes do; with leaked clusters at worst and never a dangling
 * pointer):
 * - the file is first extended (fallocate, then fdatasync) past every cluster about to be used,
 *   so no table entry can ever point past the end of the file; the steps grow with the file
 *   (8–64 MiB) and the next one starts in the background when half of the current one is used;
 * - a new cluster's data is written before the L2 entry that points at it, and a new L2 table
 *   (zeroed) before the L1 entry that points at it; a crash in between leaves an unreferenced
 *   cluster. The exception: when what the new clusters replace reads as zeros (no backing image,
 *   no compressed cluster), their data and their entries are written at once, since new space
 *   reads as zeros until its data lands (space is only ever taken past the end, grown as
 *   unwritten extents or holes): a crash shows the old zeros or the new data, as for any write
 *   in flight. A write is acknowledged only when its data and its entries are written;
 * - `flush` waits for the table writes in flight, then fdatasyncs.
 * New space is taken at the cluster-aligned end of the file, as QEMU does; a clean close trims
 * the file to what is used.
 */
import { inflateRawSync } from "node:zlib";
import { dirname, resolve } from "node:path";
import { SysError } from "../../ffi/errno.ts";
import { FileHandle } from "../../ffi/file.ts";
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE } from "../../ffi/constants.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { type Buffers, byteLength, type IoEngine } from "../../io/engine.ts";
import { createEngine } from "../../io/mod.ts";
import type { Disk } from "../disk.ts";
import type {
  DiskDone,
  DiskImpl,
  DiskInfo,
  DiskOptions,
  Driver,
  Extent,
  OpenContext,
} from "../driver.ts";
import { backingError, DiskError, ImageError } from "../errors.ts";
import { openImageFile } from "../raw.ts";
import { parseHeader, type QcowHeader } from "./header.ts";
import { compressedExtent, getEntry, Kind, kindOf, L2Cache, L2Table } from "./tables.ts";
import { readScattered, settleAll, writeGathered } from "../scatter.ts";
import { type EntryTable, TableCommits } from "./table_commits.ts";

const SECTOR = 512;
/** The file grows by at least this much at a time (one fdatasync per step). */
const GROW_STEP = 8 * 1024 * 1024;
const MAX_GROW_STEP = 64 * 1024 * 1024;
const CACHE_BYTES = 64 * 1024 * 1024;
const MAX_EXTENTS = 1024;

const alignUp = (x: number, a: number) => Math.ceil(x / a) * a;

/** One contiguous part of a read: from the file, from the base (backing or zeros), or compressed. */
interface ReadPiece {
  kind: Kind;
  /** Host offset (Normal) or guest offset (Unallocated, Compressed). */
  at: number;
  tOff: number;
  len: number;
  table: L2Table | null;
  l2i: number;
}
const alignDown = (x: number, a: number) => Math.floor(x / a) * a;

class QcowDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly #path: string;
  readonly #file: FileHandle;
  readonly #engine: IoEngine;
  readonly #h: QcowHeader;
  readonly #cs: number;
  readonly #l1Span: number; // guest bytes one L1 entry covers
  readonly #l2Entries: number;
  readonly #l2Bytes: number;
  readonly #l1: Float64Array;
  readonly #l1Region: Uint8Array; // the L1 table's sectors as on disk
  readonly #l1RegionStart: number;
  readonly #cache: L2Cache;
  readonly #backing: Disk | null;
  readonly #openedSize: number;
  #end: number; // where the next cluster goes (before alignment)
  #fileSize: number; // the file's size on disk, durable
  #growing: Promise<void> = Promise.resolve();
  readonly #l1Commits: TableCommits<EntryTable>;
  #growPending = false;
  #fallocates = true;
  /** Guest clusters (by index) being allocated: other writes to them wait. */
  readonly #claims = new Map<number, Promise<void>>();
  /** L2 tables being created, by L1 index. */
  readonly #creating = new Map<number, Promise<L2Table>>();
  /** Group commits with writes queued or in flight, by table offset. */
  readonly #commits = new Map<number, TableCommits<L2Table>>();

  constructor(
    path: string,
    file: FileHandle,
    engine: IoEngine,
    h: QcowHeader,
    l1Region: Uint8Array,
    backing: Disk | null,
    backingName: string | null,
    fileSize: number,
    readOnly: boolean,
  ) {
    this.#path = path;
    this.#file = file;
    this.#engine = engine;
    this.#h = h;
    this.#cs = 2 ** h.clusterBits;
    this.#l2Entries = 2 ** h.l2Bits;
    this.#l2Bytes = this.#l2Entries * 8;
    this.#l1Span = this.#cs * this.#l2Entries;
    this.#l1RegionStart = alignDown(h.l1Offset, SECTOR);
    this.#l1Region = l1Region;
    this.#l1 = new Float64Array(h.l1Size);
    const v = new DataView(l1Region.buffer, l1Region.byteOffset, l1Region.length);
    for (let i = 0; i < h.l1Size; i++) {
      const e = getEntry(v, h.l1Offset - this.#l1RegionStart + i * 8);
      if (e !== 0 && (e % SECTOR !== 0 || e + this.#l2Bytes > fileSize)) {
        throw new ImageError(path, `L1 entry ${i} points outside the file (offset ${e})`);
      }
      this.#l1[i] = e;
    }
    this.#l1Commits = new TableCommits(
      { offset: this.#l1RegionStart, bytes: l1Region, view: v },
      (t, lo, hi) => this.#writeTableBytes(t, lo, hi),
      () => {},
    );
    this.#cache = new L2Cache(Math.floor(CACHE_BYTES / this.#l2Bytes));
    this.#backing = backing;
    this.#end = this.#fileSize = this.#openedSize = fileSize;
    this.info = {
      size: alignDown(h.size, SECTOR),
      logicalSectorSize: SECTOR,
      physicalSectorSize: Math.min(this.#cs, 4096),
      readOnly,
      backing: backingName,
      discardFreesSpace: backing === null,
    };
  }

  // ---- metadata I/O: any offset and length, through an aligned pool buffer ----

  async #readMeta(offset: number, length: number): Promise<Uint8Array> {
    const start = alignDown(offset, SECTOR), end = alignUp(offset + length, SECTOR);
    const buf = sharedPool.take(end - start);
    try {
      const got = await this.#engine.read(this.#file, start, buf);
      if (got < end - start) buf.fill(0, got);
      return buf.slice(offset - start, offset - start + length);
    } finally {
      sharedPool.give(buf);
    }
  }

  async #writeExactly(offset: number, data: Buffers): Promise<void> {
    const n = await this.#engine.write(this.#file, offset, data);
    if (n !== byteLength(data)) {
      throw new DiskError("EIO", `write ${this.#path}: short write at ${offset}`);
    }
  }

  // ---- lookups ----

  #table(l1Index: number): L2Table | null | Promise<L2Table> {
    const off = this.#l1[l1Index];
    if (off === 0) return null;
    const committing = this.#commits.get(off);
    if (committing !== undefined) return committing.table;
    return this.#cache.get(
      off,
      async () => new L2Table(off, await this.#readMeta(off, this.#l2Bytes)),
    );
  }

  /** Host offset of a normal cluster's entry, checked against the file. */
  #host(entry: number, guest: number): number {
    if (entry % SECTOR !== 0 || entry + this.#cs > this.#fileSize) {
      throw new DiskError(
        "EIO",
        `${this.#path}: corrupt image: the cluster for offset ${guest} points outside the file (${entry})`,
      );
    }
    return entry;
  }

  // ---- read ----

  read(offset: number, bufs: Buffers): Promise<void> {
    return readScattered(offset, bufs, (at, target) => this.#readInto(at, target));
  }

  /** Plans the whole read first (lookups may throw on a corrupt image), then starts the I/O. */
  async #readInto(offset: number, target: Uint8Array): Promise<void> {
    const cs = this.#cs, end = offset + target.length, plan: ReadPiece[] = [];
    for (let pos = offset; pos < end;) {
      const l1i = Math.floor(pos / this.#l1Span);
      let table = this.#table(l1i);
      if (table instanceof Promise) table = await table;
      const inOff = pos % cs, len = Math.min(cs - inOff, end - pos), tOff = pos - offset;
      const l2i = Math.floor(pos / cs) % this.#l2Entries;
      const entry = table === null ? 0 : table.entry(l2i);
      const kind = kindOf(entry), last = plan[plan.length - 1];
      if (kind === Kind.Normal) {
        const host = this.#host(entry, pos) + inOff;
        if (last?.kind === Kind.Normal && last.at + last.len === host) last.len += len;
        else plan.push({ kind, at: host, tOff, len, table, l2i });
      } else if (kind === Kind.Unallocated) {
        if (last?.kind === Kind.Unallocated) last.len += len; // guest-contiguous by construction
        else plan.push({ kind, at: pos, tOff, len, table, l2i });
      } else {
        plan.push({ kind, at: inOff, tOff, len, table, l2i });
      }
      pos += len;
    }
    await settleAll(plan.map((p) => {
      const sub = target.subarray(p.tOff, p.tOff + p.len);
      if (p.kind === Kind.Normal) return this.#hostRead(p.at, sub);
      if (p.kind === Kind.Unallocated) return this.#readBase(p.at, sub);
      return this.#readCompressed(p.table!, p.l2i, p.at, sub);
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

  /** What an unallocated range reads as: the backing image, or zeros. */
  async #readBase(pos: number, target: Uint8Array): Promise<void> {
    const backing = this.#backing;
    const inBacking = backing === null
      ? 0
      : Math.max(0, Math.min(target.length, backing.size - pos));
    if (inBacking < target.length) target.fill(0, inBacking);
    if (inBacking > 0) await backing!.read(pos, target.subarray(0, inBacking));
  }

  async #readCompressed(
    table: L2Table,
    l2i: number,
    inOff: number,
    target: Uint8Array,
  ): Promise<void> {
    const cluster = await this.#decompress(table, l2i);
    target.set(cluster.subarray(inOff, inOff + target.length));
  }

  async #decompress(table: L2Table, l2i: number): Promise<Uint8Array> {
    const { offset, length } = compressedExtent(table.view, l2i * 8, this.#h.clusterBits);
    if (length === 0 || offset + length > this.#fileSize) {
      throw new DiskError(
        "EIO",
        `${this.#path}: corrupt compressed cluster entry (offset ${offset})`,
      );
    }
    const raw = await this.#readMeta(offset, length);
    let out: Uint8Array;
    try {
      out = inflateRawSync(raw, { finishFlush: 2 /* Z_SYNC_FLUSH: accept a stream without end */ });
    } catch (e) {
      throw new DiskError(
        "EIO",
        `${this.#path}: compressed cluster at ${offset} does not inflate`,
        { cause: e },
      );
    }
    if (out.length < this.#cs) {
      throw new DiskError(
        "EIO",
        `${this.#path}: compressed cluster at ${offset} inflates to ${out.length} bytes`,
      );
    }
    return out.subarray(0, this.#cs);
  }

  // ---- the callback form ----

  /**
   * A request over allocated, uncompressed clusters that follow each other in the file, with
   * their L2 table cached, goes straight to the engine (the ring's and FUSE's common case once an
   * image is written); anything else takes read() or write().
   */
  submit(write: boolean, offset: number, bufs: Buffers, done: DiskDone): void {
    const host = bufs instanceof Uint8Array ? this.#directHost(offset, bufs.length) : -1;
    if (host < 0) {
      (write ? this.write(offset, bufs) : this.read(offset, bufs)).then(() => done(null), done);
      return;
    }
    const length = (bufs as Uint8Array).length;
    this.#engine.submit(write, this.#file, host, bufs, (got) => {
      if (typeof got !== "number") return done(got);
      if (got === length) return done(null);
      const what = write ? "write" : "read";
      done(
        new DiskError(
          "EIO",
          `${what} ${this.#path}: short ${what} at ${host} (${got} of ${length})`,
        ),
      );
    });
  }

  /**
   * Where [offset, offset + length) lies in the file, when it can go there directly: inside one
   * L2 table's range, every cluster allocated and each following the one before in the file (a
   * range written by one request is, and so is an image made by img2qcow or convert); else -1.
   */
  #directHost(offset: number, length: number): number {
    const cs = this.#cs, l1i = Math.floor(offset / this.#l1Span);
    if (length === 0 || Math.floor((offset + length - 1) / this.#l1Span) !== l1i) return -1;
    const table = this.#table(l1i);
    if (table === null || table instanceof Promise) return -1;
    const first = Math.floor(offset / cs), last = Math.floor((offset + length - 1) / cs);
    const start = table.entry(first % this.#l2Entries);
    for (let c = first, expect = start; c <= last; c++, expect += cs) {
      const entry = c === first ? start : table.entry(c % this.#l2Entries);
      if (entry !== expect || kindOf(entry) !== Kind.Normal || entry % SECTOR !== 0) return -1;
    }
    // (a corrupt entry is reported by the slow path)
    if (start + (last - first + 1) * cs > this.#fileSize) return -1;
    return start + offset % cs;
  }

  // ---- write ----

  write(offset: number, bufs: Buffers): Promise<void> {
    return writeGathered(offset, bufs, (at, src) => this.#writeFrom(at, src));
  }

  #writeFrom(offset: number, src: Uint8Array): Promise<void> {
    const end = offset + src.length, parts: Promise<void>[] = [];
    for (let pos = offset; pos < end;) {
      const l1i = Math.floor(pos / this.#l1Span);
      const stop = Math.min(end, (l1i + 1) * this.#l1Span);
      parts.push(this.#writeInTable(l1i, pos, src.subarray(pos - offset, stop - offset)));
      pos = stop;
    }
    return settleAll(parts);
  }

  /** A write inside one L2 table's range. */
  async #writeInTable(l1i: number, offset: number, src: Uint8Array): Promise<void> {
    for (;;) {
      let table = this.#table(l1i);
      if (table instanceof Promise) table = await table;
      if (table !== null) {
        const direct = this.#directWrites(table, offset, src);
        if (direct !== null) return direct;
      }
      // Clusters another write is allocating: wait for it, then look again.
      const busy = this.#claimsIn(offset, offset + src.length);
      if (busy.length > 0) {
        await Promise.allSettled(busy);
        continue;
      }
      return this.#allocatingWrite(l1i, table, offset, src);
    }
  }

  /** Claims (allocations in progress) on the clusters of [from, to). */
  #claimsIn(from: number, to: number): Promise<void>[] {
    const found: Promise<void>[] = [];
    if (this.#claims.size === 0) return found;
    for (let c = Math.floor(from / this.#cs); c * this.#cs < to; c++) {
      const claim = this.#claims.get(c);
      if (claim !== undefined) found.push(claim);
    }
    return found;
  }

  /** Writes in place when every cluster is already allocated; null when one is not. */
  #directWrites(table: L2Table, offset: number, src: Uint8Array): Promise<void> | null {
    const cs = this.#cs, end = offset + src.length;
    for (let pos = alignDown(offset, cs); pos < end; pos += cs) {
      if (kindOf(table.entry(Math.floor(pos / cs) % this.#l2Entries)) !== Kind.Normal) return null;
    }
    let runs: number[]; // host, source offset, length; triples
    try {
      runs = this.#hostRuns(table, offset, src.length);
    } catch (e) {
      return Promise.reject(e);
    }
    const tasks: Promise<void>[] = [];
    for (let k = 0; k < runs.length; k += 3) {
      tasks.push(this.#writeExactly(runs[k], src.subarray(runs[k + 1], runs[k + 1] + runs[k + 2])));
    }
    return settleAll(tasks);
  }

  /** Host runs of allocated clusters covering [offset, offset + length), as flat triples. */
  #hostRuns(table: L2Table, offset: number, length: number): number[] {
    const cs = this.#cs, end = offset + length, runs: number[] = [];
    for (let pos = offset; pos < end;) {
      const inOff = pos % cs, len = Math.min(cs - inOff, end - pos);
      const host = this.#host(table.entry(Math.floor(pos / cs) % this.#l2Entries), pos) + inOff;
      const n = runs.length;
      if (n > 0 && runs[n - 3] + runs[n - 1] === host) runs[n - 1] += len;
      else runs.push(host, pos - offset, len);
      pos += len;
    }
    return runs;
  }

  /**
   * A write that needs new clusters. Called with no claim on any of its clusters; it claims the
   * unallocated (and compressed) ones before its first await, so writes to other clusters of the
   * same table go on concurrently. The new clusters take one run at the end of the file and are
   * written with one gathered write (fully covered clusters straight from `src`), while the L2
   * table is created if it does not exist yet; then their entries go through the table's group
   * commit.
   */
  async #allocatingWrite(
    l1i: number,
    table: L2Table | null,
    offset: number,
    src: Uint8Array,
  ): Promise<void> {
    const cs = this.#cs, end = offset + src.length;
    const direct: Promise<void>[] = [];
    const fresh: number[] = []; // pairs: l2 index, position of the cluster's data in `src` or -1
    const partial: { k: number; start: number; entry: number }[] = [];
    const claimed: number[] = [], buffers: Uint8Array<ArrayBuffer>[] = [];
    let replacesData = this.#backing !== null; // else the new clusters replace zeros
    let release = () => {};
    try {
      for (let pos = offset; pos < end;) {
        const inOff = pos % cs, len = Math.min(cs - inOff, end - pos);
        const l2i = Math.floor(pos / cs) % this.#l2Entries;
        const entry = table === null ? 0 : table.entry(l2i);
        if (kindOf(entry) === Kind.Normal) {
          direct.push(
            this.#writeExactly(
              this.#host(entry, pos) + inOff,
              src.subarray(pos - offset, pos - offset + len),
            ),
          );
        } else {
          if (len < cs) partial.push({ k: fresh.length / 2, start: pos - inOff, entry });
          if (entry !== 0) replacesData = true; // a compressed cluster
          fresh.push(l2i, len === cs ? pos - offset : -1);
        }
        pos += len;
      }
      if (fresh.length === 0) return await settleAll(direct);
      const claim = new Promise<void>((resolve) => release = resolve);
      for (let k = 0; k < fresh.length; k += 2) {
        const c = l1i * this.#l2Entries + fresh[k];
        this.#claims.set(c, claim);
        claimed.push(c);
      }
      const tableReady = table ?? this.#tableToFill(l1i);
      // Awaited below, unless this write fails first: no unhandled rejection either way.
      if (tableReady instanceof Promise) tableReady.catch(() => {});
      this.#prepareNextTable(l1i, fresh[fresh.length - 2]);
      // What a partly written new cluster does not get from `src` comes from what it read as
      // (the backing image, zeros, or the old compressed data).
      const cow = new Map<number, Uint8Array>();
      for (const p of partial) {
        const data = sharedPool.take(cs);
        buffers.push(data);
        data.fill(0); // past the virtual size, and under a backing image shorter than ours
        if (kindOf(p.entry) === Kind.Compressed) {
          data.set(await this.#decompress(table!, fresh[p.k * 2]));
        } else {
          await this.#readBase(p.start, data.subarray(0, Math.min(cs, this.info.size - p.start)));
        }
        const from = Math.max(offset, p.start), to = Math.min(end, p.start + cs);
        data.set(src.subarray(from - offset, to - offset), from - p.start);
        cow.set(p.k, data);
      }
      const count = fresh.length / 2;
      const base = await this.#allocate(count * cs);
      const segments: Uint8Array[] = [];
      let runFrom = -1, runTo = -1; // a run of whole clusters taken straight from src
      for (let k = 0; k <= count; k++) {
        const at = k < count ? fresh[k * 2 + 1] : -1;
        if (at >= 0 && at === runTo) {
          runTo += cs;
          continue;
        }
        if (runFrom >= 0) segments.push(src.subarray(runFrom, runTo));
        runFrom = runTo = -1;
        if (k === count) break;
        if (at < 0) segments.push(cow.get(k)!);
        else runFrom = at, runTo = at + cs;
      }
      const data = this.#writeExactly(base, segments.length === 1 ? segments[0] : segments);
      const pairs: number[] = [];
      for (let k = 0; k < count; k++) pairs.push(fresh[k * 2] * 8, base + k * cs);
      const commit = async (): Promise<void> => {
        const target = tableReady instanceof Promise ? await tableReady : tableReady;
        await this.#commitsFor(target).set(pairs);
      };
      if (replacesData) {
        // The entries may not point at the new clusters before their data is there.
        await settleAll([...direct, data]);
        await commit();
      } else {
        // What the clusters replace reads as zeros, and so does new space until its data lands
        // (allocated unwritten, or a hole): the entries can be written alongside the data.
        await settleAll([...direct, data, commit()]);
      }
    } catch (e) {
      await Promise.allSettled(direct); // nothing of this request may still be running
      throw e;
    } finally {
      for (const c of claimed) this.#claims.delete(c);
      release();
      for (const b of buffers) sharedPool.give(b);
    }
  }

  /**
   * A write into the last quarter of a table's range has the next table made now, if there is
   * none yet: a writer going through the disk in order then finds it ready instead of waiting for
   * its creation (a table write, then L1's group commit) every table's worth of data.
   */
  #prepareNextTable(l1i: number, l2i: number): void {
    const next = l1i + 1;
    if (l2i < (this.#l2Entries * 3) >> 2 || next >= this.#l1.length) return;
    if (this.#l1[next] !== 0 || this.#creating.has(next)) return;
    this.#tableToFill(next).catch(() => {}); // a failure shows again when a write needs it
  }

  /** The L2 table for `l1i`, created (zeroed, then pointed at from L1) when there is none. */
  #tableToFill(l1i: number): Promise<L2Table> {
    let creating = this.#creating.get(l1i);
    if (creating === undefined) {
      creating = (async () => {
        const tableOffset = await this.#allocate(this.#l2Bytes);
        const created = new L2Table(tableOffset, new Uint8Array(this.#l2Bytes));
        await this.#writeExactly(tableOffset, created.bytes);
        this.#cache.written(created);
        await this.#setL1(l1i, tableOffset);
        return created;
      })().finally(() => this.#creating.delete(l1i));
      this.#creating.set(l1i, creating);
    }
    return creating;
  }

  /** The group commit of `table`, kept (and the table with it) until its writes are done. */
  #commitsFor(table: L2Table): TableCommits<L2Table> {
    let commits = this.#commits.get(table.offset);
    if (commits === undefined) {
      commits = new TableCommits(
        table,
        (t, lo, hi) => {
          this.#cache.written(t); // a load of this table begun before now is stale
          return this.#writeTableBytes(t, lo, hi);
        },
        () => {
          this.#commits.delete(table.offset);
          this.#cache.written(table);
        },
      );
      this.#commits.set(table.offset, commits);
    }
    return commits;
  }

  /** Writes the sectors of `table` that hold bytes [lo, hi). */
  #writeTableBytes(table: EntryTable, lo: number, hi: number): Promise<void> {
    const start = alignDown(lo, SECTOR), end = Math.min(alignUp(hi, SECTOR), table.bytes.length);
    return this.#writeExactly(table.offset + start, table.bytes.subarray(start, end));
  }

  /** Points L1 entry `l1i` at a table (L1 sectors go through their own group commit). */
  async #setL1(l1i: number, tableOffset: number): Promise<void> {
    await this.#l1Commits.set([this.#h.l1Offset - this.#l1RegionStart + l1i * 8, tableOffset]);
    this.#l1[l1i] = tableOffset;
  }

  /**
   * Reserves `bytes` at the cluster-aligned end of the file. The file is grown durably before
   * any of the new space is handed out, by a step that grows with the file (an fdatasync per
   * step), and the next step starts in the background when half of the current one is used.
   */
  #allocate(bytes: number): Promise<number> {
    const start = alignUp(this.#end, this.#cs);
    this.#end = start + bytes;
    const need = this.#end;
    if (need <= this.#fileSize) {
      if (this.#fileSize - need < this.#growStep() / 2 && !this.#growPending) {
        this.#grow(need).catch(() => {}); // a failure shows at the allocation that needs it
      }
      return Promise.resolve(start);
    }
    return this.#grow(need).then(() => start);
  }

  #growStep(): number {
    return Math.min(MAX_GROW_STEP, Math.max(GROW_STEP, alignUp(this.#fileSize / 8, GROW_STEP)));
  }

  #grow(need: number): Promise<void> {
    this.#growPending = true;
    const grow = this.#growing.then(async () => {
      if (need <= this.#fileSize - this.#growStep() / 2) return;
      const size = Math.max(need, alignUp(this.#fileSize + this.#growStep(), this.#cs));
      await this.#extend(size);
      await this.#engine.fsync(this.#file, true);
      this.#fileSize = size;
    });
    this.#growing = grow.catch(() => {}).finally(() => {
      if (this.#growing === settled) this.#growPending = false;
    });
    const settled = this.#growing;
    return grow;
  }

  /**
   * Extends the file to `size` with allocated (unwritten) blocks: O_DIRECT writes into them cost
   * the file system less than writes into holes (2× the 4k allocating writes here), and a full
   * host disk shows at the growth rather than at a data write. Where fallocate is not supported,
   * the file is extended sparse.
   */
  async #extend(size: number): Promise<void> {
    if (this.#fallocates) {
      try {
        await this.#engine.fallocate(this.#file, 0, this.#fileSize, size - this.#fileSize);
        return;
      } catch (e) {
        if (!(e instanceof SysError && e.code === "EOPNOTSUPP")) throw e;
        this.#fallocates = false;
      }
    }
    this.#file.truncate(size);
  }

  /** fdatasync, after the table writes in flight (a write acknowledged in place may rely on one). */
  async flush(): Promise<void> {
    if (this.#commits.size > 0) {
      await Promise.all([...this.#commits.values()].map((c) => c.settled()));
    }
    await this.#l1Commits.settled();
    return this.#engine.fsync(this.#file, true);
  }

  // ---- discard, zeroes, block status ----

  async discard(offset: number, length: number): Promise<void> {
    if (this.#backing !== null) return; // unmapping would expose the backing image: keep the data
    const cs = this.#cs;
    const first = alignUp(offset, cs), last = alignDown(offset + length, cs);
    const parts: Promise<void>[] = [];
    for (let pos = first; pos < last;) {
      const l1i = Math.floor(pos / this.#l1Span);
      const stop = Math.min(last, (l1i + 1) * this.#l1Span);
      const from = pos;
      parts.push(this.#unmap(l1i, from, stop));
      pos = stop;
    }
    await settleAll(parts);
  }

  /** Clears the L2 entries of whole clusters [from, to), then frees their space in the file. */
  async #unmap(l1i: number, from: number, to: number): Promise<void> {
    let table: L2Table | null;
    for (;;) {
      const t = this.#table(l1i);
      table = t instanceof Promise ? await t : t;
      if (table === null) return;
      const busy = this.#claimsIn(from, to);
      if (busy.length === 0) break;
      await Promise.allSettled(busy);
    }
    const cs = this.#cs, freed: number[] = [], pairs: number[] = [];
    for (let pos = from; pos < to; pos += cs) {
      const l2i = Math.floor(pos / cs) % this.#l2Entries;
      const entry = table.entry(l2i);
      if (entry === 0) continue;
      if (kindOf(entry) === Kind.Normal) freed.push(entry);
      pairs.push(l2i * 8, 0);
    }
    if (pairs.length === 0) return;
    await this.#commitsFor(table).set(pairs);
    // The clusters are leaked (qcow has no free-space map) but give their space back.
    await Promise.all(
      freed.map((host) =>
        this.#engine.fallocate(this.#file, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, host, cs)
          .catch(() => {})
      ),
    );
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    const chunk = 1024 * 1024, zeros = sharedPool.take(Math.min(length, chunk));
    zeros.fill(0);
    try {
      for (let pos = offset; pos < offset + length;) {
        const n = Math.min(zeros.length, offset + length - pos);
        const [first] = await this.blockStatus(pos, n);
        if (first.zero && first.length >= n) {
          pos += n; // already reads as zeros
          continue;
        }
        await this.#writeFrom(pos, zeros.subarray(0, n));
        pos += n;
      }
    } finally {
      sharedPool.give(zeros);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const cs = this.#cs, end = offset + length, extents: Extent[] = [];
    for (let pos = offset; pos < end && extents.length < MAX_EXTENTS;) {
      const l1i = Math.floor(pos / this.#l1Span);
      let table = this.#table(l1i);
      if (table instanceof Promise) table = await table;
      const len = table === null
        ? Math.min((l1i + 1) * this.#l1Span, end) - pos
        : Math.min(cs - pos % cs, end - pos);
      const allocated = table !== null && table.entry(Math.floor(pos / cs) % this.#l2Entries) !== 0;
      const zero = !allocated && this.#backing === null;
      const last = extents[extents.length - 1];
      if (last !== undefined && last.allocated === allocated && last.zero === zero) {
        last.length += len;
      } else extents.push({ offset: pos, length: len, allocated, zero });
      pos += len;
    }
    return extents;
  }

  async close(): Promise<void> {
    try {
      await Promise.allSettled([...this.#creating.values()]); // tables made ahead of writes
      await this.#growing;
      // Give back what a growth step reserved and no cluster used.
      if (!this.info.readOnly && this.#fileSize > this.#openedSize) {
        const used = Math.max(this.#end, this.#openedSize);
        if (used < this.#fileSize) this.#file.truncate(used);
      }
      await this.#engine.close();
    } finally {
      try {
        this.#file.close();
      } finally {
        await this.#backing?.close();
      }
    }
  }
}

async function openQcow(path: string, options: DiskOptions, ctx: OpenContext): Promise<DiskImpl> {
  const readOnly = options.readOnly ?? false;
  const file = openImageFile(path, options, options.direct !== "off", "grows");
  let engine: IoEngine | undefined;
  let backing = null as Disk | null;
  try {
    engine = createEngine(options.engine ?? "aio", {
      depth: options.depth,
      batch: options.batch,
      coalesceAbove: options.coalesceAbove,
      pollMicros: options.pollMicros,
    });
    const fileSize = file.stat().size;
    const head = await readAligned(engine, file, 0, Math.min(4096, alignUp(fileSize, SECTOR)));
    const h = parseHeader(head.subarray(0, Math.min(head.length, fileSize)), fileSize, path);
    const regionStart = alignDown(h.l1Offset, SECTOR);
    const region = await readAligned(
      engine,
      file,
      regionStart,
      alignUp(h.l1Offset + h.l1Size * 8, SECTOR) - regionStart,
    );
    let backingName: string | null = null;
    if (h.backingOffset !== 0) {
      const start = alignDown(h.backingOffset, SECTOR);
      const raw = await readAligned(
        engine,
        file,
        start,
        alignUp(h.backingOffset + h.backingLength, SECTOR) - start,
      );
      backingName = new TextDecoder().decode(
        raw.subarray(h.backingOffset - start, h.backingOffset - start + h.backingLength),
      );
      const backingPath = resolve(dirname(path), backingName);
      try {
        backing = await ctx.openBacking(backingPath);
      } catch (e) {
        throw backingError(path, `its backing file ${JSON.stringify(backingName)}`, e);
      }
    }
    return new QcowDisk(path, file, engine, h, region, backing, backingName, fileSize, readOnly);
  } catch (e) {
    await engine?.close();
    await backing?.close();
    file.close();
    throw e;
  }
}

/** Reads whole sectors at open (before the disk exists) into plain memory. */
async function readAligned(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  length: number,
): Promise<Uint8Array> {
  const buf = sharedPool.take(length);
  try {
    const got = await engine.read(file, offset, buf);
    if (got < length) buf.fill(0, got);
    return buf.slice();
  } finally {
    sharedPool.give(buf);
  }
}

export const qcowDriver: Driver = {
  type: "qcow",
  summary: "QEMU qcow (v1) image, sparse, copy-on-write over a backing file, asynchronous",
  open: openQcow,
};
