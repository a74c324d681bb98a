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

/** Segments as indexes into data pages shared with the frontend: buffers are views, no copy. */
export class PageSegments implements SegmentData {
  readonly maxIndirectSegments = 0;
  readonly #data: Uint8Array;
  readonly #pages: number;

  constructor(data: Uint8Array) {
    this.#data = data;
    this.#pages = Math.floor(data.length / PAGE);
  }

  indirectPages(): Uint8Array {
    throw new RangeError("indirect requests are not offered on this ring");
  }

  acquire(segs: Uint32Array, n: number): Buffers {
    const bufs: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const page = segs[i * 3], first = segs[i * 3 + 1], last = segs[i * 3 + 2];
      if (page >= this.#pages) throw new RangeError(`segment ${i}: no data page ${page}`);
      bufs.push(
        this.#data.subarray(page * PAGE + first * SECTOR, page * PAGE + (last + 1) * SECTOR),
      );
    }
    return bufs;
  }

  release(): void {}
}
