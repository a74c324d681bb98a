/**
 * The other data path (`--data map`, xen-backend.md §4.4): each request's grants are mapped into
 * our address space for the duration of the request, and the disk reads or writes the guest's
 * pages directly, with no copy. It costs a MAP_GRANT_REF + mmap and a munmap + UNMAP_GRANT_REF
 * (with its TLB flush) per request, and a guest that dies mid-request stays pinned until the
 * request ends. Kept to measure against grant copy (bench/xen_data_path.ts); copy is the default.
 */
import type { GrantDevice, GrantMapping } from "../ffi/gntdev.ts";
import type { Buffers } from "../io/engine.ts";
import { BLKIF_LAYOUT } from "../ring/blkif.ts";
import type { SegmentData } from "../ring/segments.ts";

const PAGE = BLKIF_LAYOUT.PAGE_SIZE;
const SECTOR = 512;

export class MappedSegments implements SegmentData, Disposable {
  readonly maxIndirectSegments: number;
  readonly #gnt: GrantDevice;
  readonly #domid: number;
  /** The mapping behind each request's buffers (keyed by the buffer array). */
  readonly #mappings = new Map<Buffers, GrantMapping>();
  readonly #scratch = new Uint8Array(BLKIF_LAYOUT.MAX_INDIRECT_PAGES * PAGE);

  constructor(gnt: GrantDevice, domid: number, maxIndirectSegments: number) {
    this.#gnt = gnt;
    this.#domid = domid;
    this.maxIndirectSegments = maxIndirectSegments;
  }

  indirectPages(grefs: Uint32Array, count: number): Uint8Array {
    // Copied out at once: the guest may rewrite its descriptor pages under us.
    using m = this.#gnt.map(this.#domid, Array.from(grefs.subarray(0, count)), {
      writable: false,
    });
    this.#scratch.set(m.bytes);
    return this.#scratch.subarray(0, count * PAGE);
  }

  acquire(segs: Uint32Array, n: number, write: boolean): Buffers {
    const refs: number[] = [];
    for (let i = 0; i < n; i++) refs.push(segs[i * 3]);
    // A write only reads the guest's pages; a read fills them.
    const m = this.#gnt.map(this.#domid, refs, { writable: !write });
    const bufs: Uint8Array[] = [];
    for (let i = 0; i < n; i++) {
      const first = segs[i * 3 + 1], last = segs[i * 3 + 2];
      bufs.push(m.bytes.subarray(i * PAGE + first * SECTOR, i * PAGE + (last + 1) * SECTOR));
    }
    this.#mappings.set(bufs, m);
    return bufs;
  }

  release(bufs: Buffers): void {
    const m = this.#mappings.get(bufs);
    if (m === undefined) return;
    this.#mappings.delete(bufs);
    m[Symbol.dispose]();
  }

  [Symbol.dispose](): void {
    for (const m of this.#mappings.values()) m[Symbol.dispose]();
    this.#mappings.clear();
  }
}
