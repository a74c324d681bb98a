/**
 * A Xen frontend's segments reached by grant copy (xen-backend.md §4.3–§4.4): a request's data
 * moves between the guest's granted pages and one pooled, 4 KiB-aligned bounce buffer per
 * request, which the disk reads or writes as a single buffer (O_DIRECT-ready). Nothing of the
 * guest is mapped, so nothing can leak or pin its pages when it dies. The copy is one ioctl per
 * request: Xen copies up to a few hundred KiB in microseconds, so it runs on the event loop.
 */
import { GrantCopyBatch, GrantError } from "../ffi/gntdev.ts";
import { addressOf, AlignedMemory } from "../ffi/memory.ts";
import type { Buffers } from "../io/engine.ts";
import { type BufferPool, sharedPool } from "../io/buffer_pool.ts";
import { BLKIF_LAYOUT } from "../ring/blkif.ts";
import type { SegmentData } from "../ring/segments.ts";

const PAGE = BLKIF_LAYOUT.PAGE_SIZE;
const SECTOR = 512;

/** The grant copier of one ring: what GrantSegments needs of gntdev (a fake in unit tests). */
export interface GrantCopier {
  copy(batch: GrantCopyBatch, count: number): void;
}

export class GrantSegments implements SegmentData, Disposable {
  readonly maxIndirectSegments: number;
  readonly #gnt: GrantCopier;
  readonly #domid: number;
  readonly #batch: GrantCopyBatch;
  readonly #indirect: AlignedMemory;
  readonly #pool: BufferPool;

  /** `gnt` runs the copies (gntdev; a fake in unit tests); the segment batch is made here. */
  constructor(
    gnt: GrantCopier,
    domid: number,
    maxIndirectSegments: number,
    pool: BufferPool = sharedPool,
  ) {
    this.#gnt = gnt;
    this.#domid = domid;
    this.#batch = new GrantCopyBatch(
      Math.max(maxIndirectSegments, BLKIF_LAYOUT.MAX_SEGMENTS, BLKIF_LAYOUT.MAX_INDIRECT_PAGES),
    );
    this.maxIndirectSegments = maxIndirectSegments;
    this.#indirect = new AlignedMemory(BLKIF_LAYOUT.MAX_INDIRECT_PAGES * PAGE);
    this.#pool = pool;
  }

  indirectPages(grefs: Uint32Array, count: number): Uint8Array {
    const base = this.#indirect.address;
    for (let i = 0; i < count; i++) {
      this.#batch.set(i, base + i * PAGE, this.#domid, grefs[i], 0, PAGE, false);
    }
    this.#run(count, grefs, 1);
    return this.#indirect.bytes.subarray(0, count * PAGE);
  }

  acquire(segs: Uint32Array, n: number, write: boolean): Buffers {
    let bytes = 0;
    for (let i = 0; i < n; i++) bytes += (segs[i * 3 + 2] - segs[i * 3 + 1] + 1) * SECTOR;
    const buf = this.#pool.take(bytes);
    if (write) {
      try {
        this.#copy(buf, segs, n, false);
      } catch (e) {
        this.#pool.give(buf);
        throw e;
      }
    }
    return buf;
  }

  release(bufs: Buffers, segs: Uint32Array, n: number, deliver: boolean): void {
    const buf = bufs as Uint8Array<ArrayBuffer>;
    try {
      if (deliver) this.#copy(buf, segs, n, true);
    } finally {
      this.#pool.give(buf);
    }
  }

  /** Copies between `buf` and the `n` segments, in order. */
  #copy(buf: Uint8Array, segs: Uint32Array, n: number, toGuest: boolean): void {
    let address = addressOf(buf)!;
    for (let i = 0; i < n; i++) {
      const first = segs[i * 3 + 1], len = (segs[i * 3 + 2] - first + 1) * SECTOR;
      this.#batch.set(i, address, this.#domid, segs[i * 3], first * SECTOR, len, toGuest);
      address += len;
    }
    this.#run(n, segs, 3);
  }

  /** Runs `count` prepared copies; the first failed one becomes a GrantError. */
  #run(count: number, grefs: Uint32Array, stride: number): void {
    this.#gnt.copy(this.#batch, count);
    for (let i = 0; i < count; i++) {
      const status = this.#batch.status(i);
      if (status !== 0) throw new GrantError(grefs[i * stride], status);
    }
  }

  [Symbol.dispose](): void {
    this.#indirect[Symbol.dispose]();
    this.#batch[Symbol.dispose]();
  }
}
