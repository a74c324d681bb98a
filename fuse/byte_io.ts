/**
 * File semantics over a BlockTarget: what a FUSE file needs that a disk does not give directly.
 * Reads and writes at any byte offset (sector-aligned ones go straight through; others read,
 * patch and write the covering sectors, one at a time), punching holes that read back as zeros,
 * zeroing ranges, and SEEK_DATA/SEEK_HOLE from the disk's block status.
 */
import { DiskError } from "../drivers/errors.ts";
import type { DiskDone } from "../drivers/driver.ts";
import type { BlockTarget } from "../drivers/target.ts";
import { type BufferPool, sharedPool } from "../io/buffer_pool.ts";
import { SEEK_DATA, SEEK_HOLE } from "../ffi/constants.ts";

/** The largest piece read, patched and written back at once (unaligned writes and zeroing). */
const PATCH_CHUNK = 1024 * 1024;

export class ByteIo {
  readonly #target: BlockTarget;
  readonly #pool: BufferPool;
  readonly #sector: number;
  /** Read-modify-write cycles run one at a time, so two never patch the same sector at once. */
  #patching: Promise<void> = Promise.resolve();

  constructor(target: BlockTarget, pool: BufferPool = sharedPool) {
    this.#target = target;
    this.#pool = pool;
    this.#sector = target.info.logicalSectorSize;
  }

  get size(): number {
    return this.#target.size;
  }

  /**
   * Reads [offset, offset + length) (inside the disk) into `area`, which must hold `length`
   * plus two sectors. Aligned reads land at area[0]; unaligned ones read the covering sectors.
   * Resolves with the index in `area` where the requested bytes start.
   */
  async readInto(area: Uint8Array, offset: number, length: number): Promise<number> {
    const s = this.#sector;
    const start = Math.floor(offset / s) * s;
    const end = Math.ceil((offset + length) / s) * s;
    if (end - start > area.length) {
      throw new DiskError("EINVAL", `read of ${length} bytes at ${offset} is too large`);
    }
    await this.#target.read(start, area.subarray(0, end - start));
    return offset - start;
  }

  /**
   * A sector-aligned read or write in callback form (BlockTarget.submit), the hot path; false,
   * with nothing started, when `offset` or the length is not aligned (use readInto or write).
   */
  submitAligned(write: boolean, offset: number, buf: Uint8Array, done: DiskDone): boolean {
    const s = this.#sector;
    if (offset % s !== 0 || buf.length % s !== 0) return false;
    this.#target.submit(write, offset, buf, done);
    return true;
  }

  /** A read served at once from memory the target holds (BlockTarget.readInPlace), or false. */
  readInPlace(offset: number, length: number, use: (parts: Uint8Array[]) => void): boolean {
    return this.#target.readInPlace?.(offset, length, use) ?? false;
  }

  /** Writes `data` at `offset` (inside the disk). */
  write(offset: number, data: Uint8Array): Promise<void> {
    const s = this.#sector;
    if (offset % s === 0 && data.length % s === 0) return this.#target.write(offset, data);
    return this.#patch(offset, data.length, (piece, at, from) => {
      piece.set(data.subarray(from, from + piece.length - at), at);
    });
  }

  /**
   * Makes [offset, offset + length) read as zeros. With `punch` it also frees the space where
   * the disk can (the discard must then read back as zeros: what the disk could not free or
   * zero is zeroed explicitly); otherwise storage stays allocated.
   */
  async zero(offset: number, length: number, punch: boolean): Promise<void> {
    const s = this.#sector, end = offset + length;
    const first = Math.ceil(offset / s) * s, last = Math.floor(end / s) * s;
    if (first >= last) return this.#zeroBytes(offset, length);
    if (offset < first) await this.#zeroBytes(offset, first - offset);
    if (last < end) await this.#zeroBytes(last, end - last);
    if (!punch) return this.#target.writeZeroes(first, last - first, { mayUnmap: false });
    await this.#target.discard(first, last - first);
    for (const [at, n] of await this.#nonZeroRuns(first, last)) {
      await this.#target.writeZeroes(at, n, { mayUnmap: true });
    }
  }

  /**
   * lseek(2)'s SEEK_DATA / SEEK_HOLE: the first byte at or after `offset` that is data (not
   * known to read as zeros) or a hole; the end of the disk counts as a hole. null (ENXIO)
   * when `offset` is at or past the end, or there is no data after it.
   */
  async seek(offset: number, whence: number): Promise<number | null> {
    const size = this.#target.size, s = this.#sector;
    if (offset >= size || offset < 0) return null;
    const wantZero = whence === SEEK_HOLE;
    if (!wantZero && whence !== SEEK_DATA) throw new DiskError("EINVAL", `whence ${whence}`);
    for (let pos = Math.floor(offset / s) * s; pos < size;) {
      const extents = await this.#target.blockStatus(pos, size - pos);
      for (const e of extents) {
        const end = e.offset + e.length;
        if (end <= offset) continue;
        if (e.zero === wantZero) return Math.max(e.offset, offset);
      }
      const next = extents[extents.length - 1].offset + extents[extents.length - 1].length;
      if (next <= pos) throw new DiskError("EIO", `block status made no progress at ${pos}`);
      pos = next;
    }
    return wantZero ? size : null;
  }

  /** Ranges of [from, to) that do not read as zeros, by block status. */
  async #nonZeroRuns(from: number, to: number): Promise<[number, number][]> {
    const runs: [number, number][] = [];
    for (let pos = from; pos < to;) {
      const extents = await this.#target.blockStatus(pos, to - pos);
      for (const e of extents) {
        if (e.zero) continue;
        const last = runs[runs.length - 1];
        if (last !== undefined && last[0] + last[1] === e.offset) last[1] += e.length;
        else runs.push([e.offset, e.length]);
      }
      const next = extents[extents.length - 1].offset + extents[extents.length - 1].length;
      if (next <= pos) throw new DiskError("EIO", `block status made no progress at ${pos}`);
      pos = next;
    }
    return runs;
  }

  #zeroBytes(offset: number, length: number): Promise<void> {
    return this.#patch(offset, length, (piece, at) => piece.fill(0, at));
  }

  /**
   * Read-modify-write of [offset, offset + length) in pieces of whole sectors: `fill(piece, at,
   * from)` writes the new bytes into piece[at …], which hold the range's bytes from `from` on.
   */
  #patch(
    offset: number,
    length: number,
    fill: (piece: Uint8Array, at: number, from: number) => void,
  ): Promise<void> {
    const run = this.#patching.then(async () => {
      const s = this.#sector, end = offset + length;
      const buf = this.#pool.take(Math.min(PATCH_CHUNK, Math.ceil(length / s) * s + 2 * s));
      try {
        for (let pos = offset; pos < end;) {
          const start = Math.floor(pos / s) * s;
          const stop = Math.min(Math.ceil(end / s) * s, start + buf.length);
          const piece = buf.subarray(0, stop - start);
          const at = pos - start, upto = Math.min(end, stop);
          if (at !== 0 || upto !== stop) await this.#target.read(start, piece);
          fill(piece.subarray(0, upto - start), at, pos - offset);
          await this.#target.write(start, piece);
          pos = upto;
        }
      } finally {
        this.#pool.give(buf);
      }
    });
    this.#patching = run.catch(() => {});
    return run;
  }
}
