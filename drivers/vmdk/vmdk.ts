/**
 * `vmdk`: VMware's virtual disk, asynchronous. A descriptor (embedded or a text file) and its
 * extents, concatenated: hosted sparse files (monolithicSparse, twoGbMaxExtentSparse,
 * streamOptimized — the last read-only), flat/vmfs files and ZERO extents, over a parent delta
 * link (parentFileNameHint, checked against parentCID). The first write after opening gives the
 * disk a new CID, as VMware and QEMU do. Format: shared/specs/formats.md §3.
 */
import type { FileHandle } from "../../ffi/file.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import type { Buffers, IoEngine } from "../../io/engine.ts";
import { createEngine } from "../../io/mod.ts";
import type { Disk } from "../disk.ts";
import type { DiskImpl, DiskInfo, DiskOptions, Driver, Extent, OpenContext } from "../driver.ts";
import { backingError, DiskError, ImageError } from "../errors.ts";
import { openImageFile } from "../raw.ts";
import { lockImagePath } from "../image_lock.ts";
import { randomCid, withCid } from "./descriptor.ts";
import {
  alignUp,
  Alloc,
  type BaseReader,
  readMeta,
  SECTOR,
  settleAll,
  type VmdkExtent,
  writeExactly,
} from "./extent.ts";
import { FlatExtent, ZeroExtent } from "./flat.ts";
import { FLAG_COMPRESSED, type SparseHeader } from "./header.ts";
import {
  checkParent,
  readSparseHeaderOf,
  readVmdkMeta,
  relativeTo,
  type VmdkMeta,
} from "./image.ts";
import { gdRegionBytes, hasRedundantGd, SparseExtent } from "./sparse.ts";
import { readScattered, writeGathered } from "../scatter.ts";

const MAX_EXTENTS = 1024;

/** Rewrites the descriptor with a new CID (same length, in place: no moment without one). */
type CidWriter = () => Promise<void>;

class VmdkDisk implements DiskImpl {
  readonly info: DiskInfo;
  readonly #extents: VmdkExtent[];
  readonly #starts: number[];
  /** Per extent: what its unallocated ranges read as (built once, not per request). */
  readonly #bases: BaseReader[];
  readonly #engine: IoEngine;
  readonly #backing: Disk | null;
  readonly #writeCid: CidWriter;
  /** The image locks on the descriptor's file (a separate descriptor's extents hold their own). */
  readonly #descriptorLock: Disposable;
  #cidUpdate: Promise<void> | null = null;
  #cidDone = false;

  constructor(
    extents: VmdkExtent[],
    engine: IoEngine,
    backing: Disk | null,
    backingName: string | null,
    writeCid: CidWriter,
    readOnly: boolean,
    descriptorLock: Disposable,
  ) {
    this.#descriptorLock = descriptorLock;
    this.#extents = extents;
    this.#starts = [];
    let size = 0;
    for (const e of extents) {
      this.#starts.push(size);
      size += e.size;
    }
    this.#bases = this.#starts.map((start) => (pos, sub) => this.#readBase(start + pos, sub));
    this.#engine = engine;
    this.#backing = backing;
    this.#writeCid = writeCid;
    this.info = {
      size,
      logicalSectorSize: SECTOR,
      physicalSectorSize: 4096,
      readOnly,
      backing: backingName,
      discardFreesSpace: backing === null && extents.some((e) => e instanceof SparseExtent),
    };
  }

  /** Index of the extent holding byte `pos`. */
  #extentAt(pos: number): number {
    let lo = 0, hi = this.#starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.#starts[mid] <= pos) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Calls `fn` for each extent piece of [offset, offset + length). */
  #pieces<T>(
    offset: number,
    length: number,
    fn: (i: number, local: number, len: number, at: number) => Promise<T>,
  ): Promise<T>[] {
    const out: Promise<T>[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end;) {
      const i = this.#extentAt(pos), start = this.#starts[i];
      const len = Math.min(end, start + this.#extents[i].size) - pos;
      out.push(fn(i, pos - start, len, pos - offset));
      pos += len;
    }
    return out;
  }

  // ---- read ----

  read(offset: number, bufs: Buffers): Promise<void> {
    return readScattered(offset, bufs, (at, target) => this.#readInto(at, target));
  }

  #readInto(offset: number, target: Uint8Array): Promise<void> {
    if (this.#extents.length === 1) return this.#extents[0].read(offset, target, this.#bases[0]);
    return settleAll(
      this.#pieces(
        offset,
        target.length,
        (i, local, len, at) =>
          this.#extents[i].read(local, target.subarray(at, at + len), this.#bases[i]),
      ),
    );
  }

  /** What an unallocated range reads as: the parent, or zeros. */
  async #readBase(pos: number, target: Uint8Array): Promise<void> {
    const backing = this.#backing;
    const inBacking = backing === null
      ? 0
      : Math.max(0, Math.min(target.length, backing.size - pos));
    if (inBacking < target.length) target.fill(0, inBacking);
    if (inBacking > 0) await backing!.read(pos, target.subarray(0, inBacking));
  }

  // ---- write ----

  /** The first write after opening gives the disk a new CID (once; later writes skip this). */
  #newCid(): Promise<void> | null {
    if (this.#cidDone) return null;
    return this.#cidUpdate ??= this.#writeCid().then(() => {
      this.#cidDone = true;
    });
  }

  async write(offset: number, bufs: Buffers): Promise<void> {
    const cid = this.#newCid();
    if (cid !== null) await cid;
    await writeGathered(offset, bufs, (at, src) => this.#writeFrom(at, src));
  }

  #writeFrom(offset: number, src: Uint8Array): Promise<void> {
    return settleAll(this.#pieces(offset, src.length, (i, local, len, at) => {
      const e = this.#extents[i];
      if (!e.writable) {
        return Promise.reject(
          new DiskError("EROFS", `write: offset ${offset + at} lies in a read-only extent`),
        );
      }
      return e.write(local, src.subarray(at, at + len), this.#bases[i]);
    }));
  }

  async flush(): Promise<void> {
    await settleAll(this.#extents.map((e) => e.flush()));
  }

  async discard(offset: number, length: number): Promise<void> {
    if (this.#backing !== null) return;
    const cid = this.#newCid();
    if (cid !== null) await cid;
    await settleAll(
      this.#pieces(
        offset,
        length,
        (i, local, len) =>
          this.#extents[i].writable ? this.#extents[i].discard(local, len) : Promise.resolve(),
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
        if (!(first.zero && first.length >= n)) await this.write(pos, zeros.subarray(0, n));
        pos += n;
      }
    } finally {
      sharedPool.give(zeros);
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const end = offset + length, extents: Extent[] = [];
    for (let pos = offset; pos < end && extents.length < MAX_EXTENTS;) {
      const i = this.#extentAt(pos), start = this.#starts[i], e = this.#extents[i];
      const run = await e.status(pos - start, Math.min(end, start + e.size) - pos);
      const allocated = run.state === Alloc.Data;
      const zero = run.state === Alloc.Zero ||
        (run.state === Alloc.Unallocated && this.#backing === null);
      const last = extents[extents.length - 1];
      if (last !== undefined && last.allocated === allocated && last.zero === zero) {
        last.length += run.length;
      } else extents.push({ offset: pos, length: run.length, allocated, zero });
      pos += run.length;
    }
    return extents;
  }

  async close(): Promise<void> {
    try {
      await settleAll(this.#extents.map(async (e) => await e.close()));
    } finally {
      try {
        await this.#engine.close();
      } finally {
        this.#descriptorLock[Symbol.dispose]();
        await this.#backing?.close();
      }
    }
  }
}

// ---- opening ----

/** Opens one sparse extent file: header (a stream's footer), GD and redundant GD. */
async function openSparse(
  path: string,
  file: FileHandle,
  engine: IoEngine,
  header: SparseHeader | null,
  sectors: number | null,
  writable: boolean,
  hasParent: boolean,
): Promise<SparseExtent> {
  const fileSize = file.stat().size;
  const h = header ?? readSparseHeaderOf(path);
  const n = sectors ?? h.capacity;
  if (n > h.capacity) {
    throw new ImageError(path, `extent of ${n} sectors but its header holds ${h.capacity}`);
  }
  if (writable && (h.flags & FLAG_COMPRESSED) !== 0) {
    throw new ImageError(
      path,
      "streamOptimized (compressed) VMDK extents are read-only in tapd: open with ,ro",
    );
  }
  const gdBytes = gdRegionBytes(h);
  const gd = await readMeta(engine, file, h.gdOffset * SECTOR, gdBytes);
  const rgd = hasRedundantGd(h)
    ? await readMeta(engine, file, h.rgdOffset * SECTOR, gdBytes)
    : null;
  return new SparseExtent(path, file, engine, h, n, gd, rgd, fileSize, writable, hasParent);
}

function cidWriter(
  meta: VmdkMeta,
  engine: IoEngine,
  embeddedFile: FileHandle | null,
): CidWriter {
  return async () => {
    const d = meta.descriptor;
    const text = withCid(d, randomCid(d.cidText.length, d.cid));
    const bytes = new TextEncoder().encode(text);
    if (meta.embedded === null) {
      // A descriptor file: overwrite in place (same length), then make it durable.
      using f = await Deno.open(meta.path, { write: true });
      await f.write(bytes);
      await f.syncData();
    } else if (embeddedFile !== null && meta.embedded.areaOffset !== 0) {
      const { areaOffset, area } = meta.embedded;
      if (bytes.length > area.length) return;
      const len = alignUp(bytes.length, SECTOR);
      const sectors = area.slice(0, len);
      sectors.set(bytes);
      await writeExactly(engine, embeddedFile, meta.path, areaOffset, sectors);
    }
    meta.descriptor = { ...d, text, cid: parseInt(text.match(/CID=([0-9a-fA-F]+)/)![1], 16) };
  };
}

async function openVmdk(path: string, options: DiskOptions, ctx: OpenContext): Promise<DiskImpl> {
  const readOnly = options.readOnly ?? false;
  // The descriptor is part of the image (its CID is rewritten in place): locked as one, and
  // before it is read, so that metadata another process is writing is not read.
  const descriptorLock = lockImagePath(path, {
    readOnly,
    forceShare: options.forceShare,
    grows: false,
  });
  const direct = options.direct !== "off";
  const extents: VmdkExtent[] = [];
  let engine: IoEngine | undefined;
  let backing = null as Disk | null;
  let embeddedFile: FileHandle | null = null;
  try {
    const meta = readVmdkMeta(path);
    const parent = checkParent(meta);
    engine = createEngine(options.engine ?? "aio", {
      depth: options.depth,
      batch: options.batch,
      coalesceAbove: options.coalesceAbove,
      pollMicros: options.pollMicros,
    });
    const hasParent = parent !== null;
    if (meta.embedded !== null) {
      const file = openImageFile(path, options, direct, "grows");
      try {
        extents.push(
          await openSparse(path, file, engine, meta.embedded.header, null, !readOnly, hasParent),
        );
      } catch (e) {
        file.close();
        throw e;
      }
      embeddedFile = file;
    } else {
      for (const line of meta.descriptor.extents) {
        if (line.type === "ZERO") {
          extents.push(new ZeroExtent(line.sectors));
          continue;
        }
        if (line.access === "NOACCESS") {
          throw new ImageError(path, `extent ${JSON.stringify(line.file)} is NOACCESS`);
        }
        const extPath = relativeTo(meta, line.file);
        const writable = !readOnly && line.access === "RW";
        let file: FileHandle;
        try {
          file = openImageFile(
            extPath,
            { ...options, readOnly: !writable },
            direct,
            line.type === "SPARSE" ? "grows" : "fixed",
          );
        } catch (e) {
          throw new ImageError(
            path,
            `cannot open extent ${JSON.stringify(line.file)}: ${(e as Error).message}`,
          );
        }
        try {
          if (line.type === "SPARSE") {
            extents.push(
              await openSparse(extPath, file, engine, null, line.sectors, writable, hasParent),
            );
          } else {
            extents.push(
              new FlatExtent(extPath, file, engine, line.sectors, line.offset, writable),
            );
          }
        } catch (e) {
          file.close();
          throw e;
        }
      }
    }
    if (parent !== null) {
      try {
        backing = await ctx.openBacking(parent.path);
      } catch (e) {
        throw backingError(
          path,
          `its parent ${JSON.stringify(meta.descriptor.parentFileNameHint)}`,
          e,
        );
      }
    }
    return new VmdkDisk(
      extents,
      engine,
      backing,
      meta.descriptor.parentFileNameHint,
      cidWriter(meta, engine, embeddedFile),
      readOnly,
      descriptorLock,
    );
  } catch (e) {
    for (const x of extents) await (async () => await x.close())().catch(() => {});
    await engine?.close();
    await backing?.close();
    descriptorLock[Symbol.dispose]();
    throw e;
  }
}

export const vmdkDriver: Driver = {
  type: "vmdk",
  summary: "VMware VMDK (sparse, flat, split, streamOptimized read), delta links, asynchronous",
  open: openVmdk,
};
