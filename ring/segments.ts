/**
 * Where a blkif request's data lives. A segment names a page (a "grant reference") and a sector
 * range inside it; what a reference means belongs to the ring's carrier: an index into shared
 * data pages (the local transport, ring/local.ts), or a Xen grant reached by grant copy
 * (xen/grant_segments.ts). The RingServer validates the sector ranges, then asks its
 * SegmentData for buffers and hands those to the disk.
 */
import type { Buffers } from "../io/engine.ts";
import { BLKIF_LAYOUT } from "./blkif.ts";

const PAGE = BLKIF_LAYOUT.PAGE_SIZE;
const SECTOR = 512;

/** Segments are triples in a Uint32Array: gref, first_sect, last_sect. */
export interface SegmentData {
  /** The most segments an INDIRECT request may carry; 0 when indirect requests are not offered. */
  readonly maxIndirectSegments: number;
  /**
   * The `count` indirect descriptor pages named by `grefs`, as count × 4096 bytes (a view valid
   * until the next call). Throws when a page cannot be read.
   */
  indirectPages(grefs: Uint32Array, count: number): Uint8Array;
  /** Buffers for `n` checked segments; for a write, holding the frontend's data. */
  acquire(segs: Uint32Array, n: number, write: boolean): Buffers;
  /**
   * Ends a request's use of `bufs`: when `deliver`, a read's data goes to the frontend first
   * (throws when it cannot). The buffers are released either way.
   */
  release(bufs: Buffers, segs: Uint32Array, n: number, deliver: boolean): void;
}

/**
 * Segments as indexes into data pages shared with the frontend: buffers are views, no copy.
 * Segments that continue each other in memory (a whole page, then the next page from its
 * start) become one buffer, so a large request reaches the kernel as one transfer.
 */
export class PageSegments implements SegmentData {
  readonly maxIndirectSegments: number;
  readonly #data: Uint8Array;
  readonly #pages: number;
  #scratch: Uint8Array | null = null;

  constructor(data: Uint8Array, maxIndirectSegments = 0) {
    this.#data = data;
    this.#pages = Math.floor(data.length / PAGE);
    this.maxIndirectSegments = maxIndirectSegments;
  }

  indirectPages(grefs: Uint32Array, count: number): Uint8Array {
    if (this.maxIndirectSegments === 0) {
      throw new RangeError("indirect requests are not offered on this ring");
    }
    for (let i = 0; i < count; i++) {
      if (grefs[i] >= this.#pages) {
        throw new RangeError(`indirect page ${i}: no data page ${grefs[i]}`);
      }
    }
    if (count === 1) return this.#data.subarray(grefs[0] * PAGE, (grefs[0] + 1) * PAGE);
    if (this.#scratch === null || this.#scratch.length < count * PAGE) {
      this.#scratch = new Uint8Array(count * PAGE);
    }
    for (let i = 0; i < count; i++) {
      this.#scratch.set(this.#data.subarray(grefs[i] * PAGE, (grefs[i] + 1) * PAGE), i * PAGE);
    }
    return this.#scratch.subarray(0, count * PAGE);
  }

  acquire(segs: Uint32Array, n: number): Buffers {
    const bufs: Uint8Array[] = [];
    let start = -1, end = -1; // byte range of the buffer being built
    for (let i = 0; i < n; i++) {
      const page = segs[i * 3], first = segs[i * 3 + 1], last = segs[i * 3 + 2];
      if (page >= this.#pages) throw new RangeError(`segment ${i}: no data page ${page}`);
      const from = page * PAGE + first * SECTOR, to = page * PAGE + (last + 1) * SECTOR;
      if (from === end) {
        end = to;
        continue;
      }
      if (start >= 0) bufs.push(this.#data.subarray(start, end));
      start = from;
      end = to;
    }
    if (start >= 0) bufs.push(this.#data.subarray(start, end));
    return bufs.length === 1 ? bufs[0] : bufs;
  }

  release(): void {}
}
