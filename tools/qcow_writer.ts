/**
 * A streaming raw → qcow writer (no driver in between). The source is read in large chunks,
 * several at a time, with O_DIRECT when it can be; all-zero clusters are dropped, and every other
 * cluster is appended, in guest order, at the end of the output. The L2 tables are kept in memory
 * and written after the data, then the header and the L1 table, then the file is fdatasync'd.
 * The file is laid out as QEMU would leave it: header, backing-less L1 right after it, clusters
 * at cluster-aligned offsets.
 */
import { newImageBytes, parseHeader } from "../drivers/qcow/header.ts";
import { O_DIRECT, O_RDONLY, SEEK_DATA, SEEK_HOLE } from "../ffi/constants.ts";
import { SysError } from "../ffi/errno.ts";
import { FileHandle } from "../ffi/file.ts";
import { lockImageFile } from "../drivers/image_lock.ts";
import { sharedPool } from "../io/buffer_pool.ts";
import type { IoEngine } from "../io/engine.ts";
import { createEngine } from "../io/mod.ts";
import { alignUp, type Geometry } from "./qcow_layout.ts";

/** A raw source: a regular file or a block device, open for reading. */
export interface RawSource {
  readonly file: FileHandle;
  readonly engine: IoEngine;
  /** Bytes of data (the file or device size). */
  readonly size: number;
  readonly regular: boolean;
  readonly direct: boolean;
  close(): Promise<void>;
}

/** Opens a source with O_DIRECT and libaio, or buffered with the thread-pool engine. */
export function openRawSource(path: string, depth: number, forceShare = false): RawSource {
  let file: FileHandle, direct = true;
  try {
    file = FileHandle.open(path, O_RDONLY | O_DIRECT);
  } catch (e) {
    if (!(e instanceof SysError && e.code === "EINVAL")) throw e;
    file = FileHandle.open(path, O_RDONLY);
    direct = false;
  }
  try {
    lockImageFile(file, path, { readOnly: true, forceShare });
    const st = file.stat();
    if (!st.isRegular && !st.isBlockDevice) {
      throw new Error(`"${path}" is neither a regular file nor a block device`);
    }
    const size = st.isBlockDevice ? file.blockDeviceSize() : st.size;
    const engine = createEngine(direct ? "aio" : "sync", { depth });
    return {
      file,
      engine,
      size,
      regular: st.isRegular,
      direct,
      async close() {
        await engine.close();
        file.close();
      },
    };
  } catch (e) {
    file.close();
    throw e;
  }
}

export interface WriterOptions {
  geometry: Geometry;
  /** Bytes per source read (a multiple of the cluster size). */
  chunkSize?: number;
  /** Source reads in flight. */
  readDepth?: number;
  /** Output writes in flight (each holds one chunk buffer). */
  writeDepth?: number;
  /** Called with the bytes of the source dealt with so far (monotonic). */
  onProgress?: (done: number) => void;
}

export interface WriterResult {
  virtualSize: number;
  /** Clusters stored (non-zero). */
  dataClusters: number;
  /** Bytes of the output file. */
  fileSize: number;
}

const DEFAULT_CHUNK = 8 * 1024 * 1024;
const L2_WRITE_BATCH = 8 * 1024 * 1024;

/** The source's byte ranges that may hold data, widened to whole clusters. */
async function dataRanges(src: RawSource, cluster: number): Promise<[number, number][]> {
  const whole: [number, number][] = [[0, alignUp(src.size, cluster)]];
  if (!src.regular) return whole;
  const ranges: [number, number][] = [];
  let pos = 0;
  try {
    while (pos < src.size) {
      const data = await seek(src.file, pos, SEEK_DATA);
      if (data === null) break;
      const hole = Math.min((await seek(src.file, data, SEEK_HOLE)) ?? src.size, src.size);
      const start = Math.floor(data / cluster) * cluster, end = alignUp(hole, cluster);
      const last = ranges[ranges.length - 1];
      if (last !== undefined && start <= last[1]) last[1] = Math.max(last[1], end);
      else ranges.push([start, end]);
      pos = hole;
    }
  } catch (e) {
    // A file system without SEEK_DATA: read everything.
    if (e instanceof SysError && (e.code === "EINVAL" || e.code === "EOPNOTSUPP")) return whole;
    throw e;
  }
  return ranges;
}

async function seek(file: FileHandle, pos: number, whence: number): Promise<number | null> {
  try {
    return await file.seek(pos, whence);
  } catch (e) {
    if (e instanceof SysError && e.code === "ENXIO") return null;
    throw e;
  }
}

/** Pieces of at most `chunk` bytes covering the ranges, in order. */
function* pieces(ranges: [number, number][], chunk: number): Generator<[number, number]> {
  for (const [start, end] of ranges) {
    for (let off = start; off < end; off += chunk) yield [off, Math.min(chunk, end - off)];
  }
}

/** A fixed set of chunk buffers; `take` waits for one to come back. */
class ChunkBuffers {
  #free: Uint8Array<ArrayBuffer>[] = [];
  #all: Uint8Array<ArrayBuffer>[] = [];
  #waiting: ((b: Uint8Array<ArrayBuffer>) => void)[] = [];

  constructor(count: number, size: number) {
    for (let i = 0; i < count; i++) this.#all.push(sharedPool.take(size));
    this.#free = [...this.#all];
  }

  take(): Promise<Uint8Array<ArrayBuffer>> {
    const b = this.#free.pop();
    return b !== undefined ? Promise.resolve(b) : new Promise((go) => this.#waiting.push(go));
  }

  give(b: Uint8Array<ArrayBuffer>): void {
    const waiter = this.#waiting.shift();
    if (waiter !== undefined) waiter(b);
    else this.#free.push(b);
  }

  dispose(): void {
    for (const b of this.#all) sharedPool.give(b);
    this.#all = [];
  }
}

interface Chunk {
  offset: number;
  length: number;
  buf: Uint8Array<ArrayBuffer>;
}

/** Indexes (within the chunk) of the clusters that hold a non-zero byte, as [first, end) runs. */
function nonZeroRuns(buf: Uint8Array, length: number, cluster: number): [number, number][] {
  const words = new Int32Array(buf.buffer, buf.byteOffset, length >> 2);
  const perCluster = cluster >> 2, clusters = length / cluster;
  const runs: [number, number][] = [];
  for (let c = 0; c < clusters; c++) {
    let w = c * perCluster;
    const end = w + perCluster;
    while (w < end && words[w] === 0) w++;
    if (w === end) continue;
    const last = runs[runs.length - 1];
    if (last !== undefined && last[1] === c) last[1] = c + 1;
    else runs.push([c, c + 1]);
  }
  return runs;
}

/**
 * Writes the qcow image of `src` into `out` (an empty file), through `outEngine`. On failure the
 * output is left incomplete: the caller removes it.
 */
export async function writeQcow(
  src: RawSource,
  out: FileHandle,
  outEngine: IoEngine,
  options: WriterOptions,
): Promise<WriterResult> {
  const { clusterBits, l2Bits } = options.geometry;
  const cluster = 2 ** clusterBits, l2Entries = 2 ** l2Bits, l2Bytes = l2Entries * 8;
  const chunkSize = alignUp(options.chunkSize ?? DEFAULT_CHUNK, cluster);
  const readDepth = options.readDepth ?? 4, writeDepth = options.writeDepth ?? 4;
  const virtualSize = alignUp(src.size, 512);
  const image = newImageBytes({ size: virtualSize, clusterBits, l2Bits });
  const header = parseHeader(image, image.length, out.path);
  const l2Tables: (DataView | undefined)[] = new Array(header.l1Size);
  let end = alignUp(image.length, cluster); // where the next cluster goes
  let dataClusters = 0;

  const buffers = new ChunkBuffers(readDepth + writeDepth, chunkSize);
  const reads: Promise<Chunk>[] = [];
  const writes = new Set<Promise<void>>();
  let failure: Error | null = null;
  const next = pieces(await dataRanges(src, cluster), chunkSize);
  let pending = next.next();

  const read = async (offset: number, length: number, buf: Uint8Array<ArrayBuffer>) => {
    const got = await src.engine.read(src.file, offset, buf.subarray(0, length));
    if (got < length) {
      if (offset + got < src.size) {
        throw new Error(`read ${src.file.path}: short read (${got} of ${length} at ${offset})`);
      }
      buf.fill(0, got, length); // the last cluster, zero-padded
    }
    return { offset, length, buf };
  };

  try {
    for (;;) {
      while (failure === null && reads.length < readDepth && !pending.done) {
        const [offset, length] = pending.value;
        pending = next.next();
        const p = read(offset, length, await buffers.take());
        p.catch(() => {}); // awaited in order below; this only silences an early rejection
        reads.push(p);
      }
      if (reads.length === 0) break;
      const chunk = await reads.shift()!;
      const runs = failure === null ? nonZeroRuns(chunk.buf, chunk.length, cluster) : [];
      if (runs.length === 0) {
        buffers.give(chunk.buf);
      } else {
        const parts: Uint8Array[] = [];
        const at = end;
        for (const [first, last] of runs) {
          parts.push(chunk.buf.subarray(first * cluster, last * cluster));
          for (let c = first; c < last; c++) {
            const index = chunk.offset / cluster + c;
            const l1i = Math.floor(index / l2Entries);
            const table = l2Tables[l1i] ??= new DataView(new ArrayBuffer(l2Bytes));
            const pos = (index % l2Entries) * 8;
            table.setUint32(pos, Math.floor(end / 0x100000000));
            table.setUint32(pos + 4, end % 0x100000000);
            end += cluster;
          }
          dataClusters += last - first;
        }
        const w = writeAll(outEngine, out, at, parts)
          .catch((e: Error) => {
            failure ??= e;
          })
          .finally(() => {
            buffers.give(chunk.buf);
            writes.delete(w);
          });
        writes.add(w);
      }
      options.onProgress?.(Math.min(src.size, chunk.offset + chunk.length));
    }
    await Promise.all(writes);
    if (failure === null) options.onProgress?.(src.size); // past a trailing hole
  } catch (e) {
    failure ??= e as Error;
    await Promise.allSettled([...reads, ...writes]);
  } finally {
    buffers.dispose();
  }
  if (failure !== null) throw failure;

  // L2 tables after the data, in L1 order; then the header and the L1 table.
  const l1 = new DataView(image.buffer, header.l1Offset, header.l1Size * 8);
  let l2Pos = alignUp(end, cluster);
  const fileEnd = l2Pos + l2Tables.filter((t) => t !== undefined).length * l2Bytes;
  let batch: Uint8Array[] = [], batchStart = l2Pos, batchBytes = 0;
  for (let l1i = 0; l1i < header.l1Size; l1i++) {
    const table = l2Tables[l1i];
    if (table === undefined) continue;
    l1.setUint32(l1i * 8, Math.floor(l2Pos / 0x100000000));
    l1.setUint32(l1i * 8 + 4, l2Pos % 0x100000000);
    batch.push(new Uint8Array(table.buffer));
    batchBytes += l2Bytes;
    l2Pos += l2Bytes;
    if (batchBytes >= L2_WRITE_BATCH) {
      await writeAll(outEngine, out, batchStart, [concat(batch, batchBytes)]);
      batch = [];
      batchStart = l2Pos;
      batchBytes = 0;
    }
  }
  if (batchBytes > 0) await writeAll(outEngine, out, batchStart, [concat(batch, batchBytes)]);
  await writeAll(outEngine, out, 0, [image]);
  await outEngine.fsync(out, true);
  return { virtualSize, dataClusters, fileSize: dataClusters === 0 ? image.length : fileEnd };
}

function concat(parts: Uint8Array[], total: number): Uint8Array {
  const all = new Uint8Array(total);
  let off = 0;
  for (const p of parts) {
    all.set(p, off);
    off += p.length;
  }
  return all;
}

async function writeAll(
  engine: IoEngine,
  file: FileHandle,
  offset: number,
  parts: Uint8Array[],
): Promise<void> {
  let total = 0;
  for (const p of parts) total += p.length;
  const n = await engine.write(file, offset, parts.length === 1 ? parts[0] : parts);
  if (n !== total) {
    throw new Error(`write ${file.path}: short write (${n} of ${total} bytes at ${offset})`);
  }
}
