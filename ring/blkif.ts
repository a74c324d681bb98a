/**
 * Xen's blkif shared ring (xen/io/ring.h + xen/io/blkif.h, x86-64 ABI), backend side, over any
 * shared memory: the layout, reading requests and writing responses, and the producer/consumer
 * rules of Xen's macros (RING_FINAL_CHECK_FOR_REQUESTS, RING_PUSH_RESPONSES_AND_CHECK_NOTIFY).
 * Views over the ring page are made once. Indexes are read and published with Atomics; the two
 * places where the protocol needs a store ordered before a later load (Xen's mb()) use
 * fullBarrier(), since Atomics on memory that is not a SharedArrayBuffer promise nothing to
 * another process.
 */
import { fullBarrier } from "../ffi/memory.ts";

/** Byte layout, checked against C's sizeof/offsetof in tests/ring/layout_test.ts. */
export const BLKIF_LAYOUT = {
  PAGE_SIZE: 4096,
  RING_OFFSET: 64, // offsetof(struct blkif_sring, ring)
  ENTRY_SIZE: 112, // sizeof(union blkif_sring_entry)
  RING_SIZE: 32, // __RING_SIZE for one page
  REQUEST_SIZE: 112,
  RESPONSE_SIZE: 16,
  SEGMENT_SIZE: 8,
  MAX_SEGMENTS: 11,
  // struct blkif_sring
  OFF_REQ_PROD: 0,
  OFF_REQ_EVENT: 4,
  OFF_RSP_PROD: 8,
  OFF_RSP_EVENT: 12,
  // struct blkif_request
  OFF_OPERATION: 0,
  OFF_NR_SEGMENTS: 1,
  OFF_HANDLE: 2,
  OFF_ID: 8,
  OFF_SECTOR_NUMBER: 16,
  OFF_SEG: 24,
  // struct blkif_request_segment
  OFF_SEG_GREF: 0,
  OFF_SEG_FIRST_SECT: 4,
  OFF_SEG_LAST_SECT: 5,
  // struct blkif_request_discard
  OFF_DISCARD_FLAG: 1,
  OFF_DISCARD_NR_SECTORS: 24,
  // struct blkif_request_indirect
  OFF_INDIRECT_OP: 1,
  OFF_INDIRECT_NR_SEGMENTS: 2,
  OFF_INDIRECT_GREFS: 28,
  MAX_INDIRECT_PAGES: 8, // BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST
  SEGMENTS_PER_INDIRECT_PAGE: 512,
  // struct blkif_response
  OFF_RSP_ID: 0,
  OFF_RSP_OPERATION: 8,
  OFF_RSP_STATUS: 10,
} as const;

export const BLKIF_OP_READ = 0;
export const BLKIF_OP_WRITE = 1;
export const BLKIF_OP_WRITE_BARRIER = 2;
export const BLKIF_OP_FLUSH_DISKCACHE = 3;
export const BLKIF_OP_DISCARD = 5;
export const BLKIF_OP_INDIRECT = 6;
export const BLKIF_RSP_OKAY = 0;
export const BLKIF_RSP_ERROR = -1;
export const BLKIF_RSP_EOPNOTSUPP = -2;

const L = BLKIF_LAYOUT;

/** __CONST_RING_SIZE(blkif, bytes): entries of a ring `bytes` long (a power of two). */
export function ringEntries(bytes: number): number {
  const fit = Math.floor((bytes - L.RING_OFFSET) / L.ENTRY_SIZE);
  if (fit < 1) throw new RangeError(`A ${bytes}-byte ring holds no entry`);
  return 2 ** Math.floor(Math.log2(fit));
}

/**
 * One request, copied out of its ring slot (the slot is reused for the response). The object
 * belongs to the ring and is reused once the request is answered: nothing may keep it past
 * `respond()`. (A fresh typed array costs ~0.8 µs here, more than the rest of a request's path.)
 */
export class BlkifRequest {
  operation = 0;
  /** The operation a response carries: READ or WRITE for an INDIRECT request. */
  responseOp = 0;
  nrSegments = 0;
  idLo = 0;
  idHi = 0;
  sector = 0;
  /** Direct requests: gref, first_sect, last_sect per segment (the first nrSegments are set). */
  readonly segments: Uint32Array = new Uint32Array(L.MAX_SEGMENTS * 3);
  /** discard: sectors. */
  nrSectors = 0;
  /** INDIRECT: the grants of the pages holding the segment descriptors. */
  readonly indirectGrefs: Uint32Array = new Uint32Array(L.MAX_INDIRECT_PAGES);
  /** INDIRECT: room for the segments read out of those pages (grown on demand, then kept). */
  indirectSegments: Uint32Array = EMPTY_SEGMENTS;
}

const EMPTY_SEGMENTS = new Uint32Array(0);

/** The backend's half of a shared ring in `page` (one or more contiguous 4096-byte pages). */
export class BackRing {
  /** Entries in the ring. */
  readonly size: number;
  readonly #words: Uint32Array;
  readonly #bytes: Uint8Array;
  readonly #view: DataView;
  #reqCons = 0;
  #rspProdPvt = 0;
  /** Requests answered, for reuse (at most `size` are taken and unanswered at once). */
  readonly #free: BlkifRequest[] = [];

  constructor(page: Uint8Array) {
    this.#bytes = page;
    this.size = ringEntries(page.byteLength);
    this.#words = new Uint32Array(page.buffer, page.byteOffset, L.RING_OFFSET / 4);
    this.#view = new DataView(page.buffer, page.byteOffset, page.byteLength);
  }

  /** SHARED_RING_INIT: producers 0, both event indexes 1. */
  initShared(): void {
    this.#bytes.fill(0, 0, L.RING_OFFSET);
    Atomics.store(this.#words, L.OFF_REQ_EVENT / 4, 1);
    Atomics.store(this.#words, L.OFF_RSP_EVENT / 4, 1);
    this.#reqCons = this.#rspProdPvt = 0;
  }

  /** Requests the frontend has published and we have not consumed (the overflow-safe rule). */
  unconsumed(): number {
    const prod = Atomics.load(this.#words, L.OFF_REQ_PROD / 4);
    const req = (prod - this.#reqCons) >>> 0;
    const rsp = this.size - ((this.#reqCons - this.#rspProdPvt) >>> 0);
    return Math.min(req, rsp);
  }

  /**
   * RING_REQUEST_PROD_OVERFLOW: the frontend claims more unconsumed requests than the ring
   * holds, so it is buggy or hostile and the ring must stop.
   */
  producerOverflow(): boolean {
    const prod = Atomics.load(this.#words, L.OFF_REQ_PROD / 4);
    return ((prod - this.#reqCons) >>> 0) > this.size;
  }

  /** Copies out the next request and advances req_cons; validation is the caller's, on the copy. */
  take(): BlkifRequest {
    const base = L.RING_OFFSET + (this.#reqCons & (this.size - 1)) * L.ENTRY_SIZE;
    this.#reqCons = (this.#reqCons + 1) >>> 0;
    const v = this.#view;
    const req = this.#free.pop() ?? new BlkifRequest();
    const operation = v.getUint8(base + L.OFF_OPERATION);
    req.operation = operation;
    req.sector = v.getUint32(base + L.OFF_SECTOR_NUMBER, true) +
      v.getUint32(base + L.OFF_SECTOR_NUMBER + 4, true) * 0x100000000;
    req.idLo = v.getUint32(base + L.OFF_ID, true);
    req.idHi = v.getUint32(base + L.OFF_ID + 4, true);
    if (operation === BLKIF_OP_INDIRECT) {
      const grefs = req.indirectGrefs;
      for (let i = 0; i < grefs.length; i++) {
        grefs[i] = v.getUint32(base + L.OFF_INDIRECT_GREFS + 4 * i, true);
      }
      req.responseOp = v.getUint8(base + L.OFF_INDIRECT_OP);
      req.nrSegments = v.getUint16(base + L.OFF_INDIRECT_NR_SEGMENTS, true);
      req.nrSectors = 0;
      return req;
    }
    const nr = v.getUint8(base + L.OFF_NR_SEGMENTS), segs = req.segments;
    for (let i = 0, n = Math.min(nr, L.MAX_SEGMENTS); i < n; i++) {
      const s = base + L.OFF_SEG + i * L.SEGMENT_SIZE;
      segs[i * 3] = v.getUint32(s + L.OFF_SEG_GREF, true);
      segs[i * 3 + 1] = v.getUint8(s + L.OFF_SEG_FIRST_SECT);
      segs[i * 3 + 2] = v.getUint8(s + L.OFF_SEG_LAST_SECT);
    }
    req.responseOp = operation;
    req.nrSegments = nr;
    req.nrSectors = v.getUint32(base + L.OFF_DISCARD_NR_SECTORS, true) +
      v.getUint32(base + L.OFF_DISCARD_NR_SECTORS + 4, true) * 0x100000000;
    return req;
  }

  /**
   * Writes a response into the next response slot (not yet visible to the frontend); `req` goes
   * back to the ring for reuse.
   */
  respond(req: BlkifRequest, status: number): void {
    const base = L.RING_OFFSET + (this.#rspProdPvt & (this.size - 1)) * L.ENTRY_SIZE;
    this.#rspProdPvt = (this.#rspProdPvt + 1) >>> 0;
    const v = this.#view;
    v.setUint32(base + L.OFF_RSP_ID, req.idLo, true);
    v.setUint32(base + L.OFF_RSP_ID + 4, req.idHi, true);
    v.setUint8(base + L.OFF_RSP_OPERATION, req.responseOp);
    v.setInt16(base + L.OFF_RSP_STATUS, status, true);
    this.#free.push(req);
  }

  /** RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publishes responses; true if the frontend wants a kick. */
  pushResponses(): boolean {
    const w = this.#words;
    const old = Atomics.load(w, L.OFF_RSP_PROD / 4), next = this.#rspProdPvt;
    if (old === next) return false;
    Atomics.store(w, L.OFF_RSP_PROD / 4, next); // responses are written before the index (x86 TSO)
    fullBarrier(); // the index before reading the event
    const event = Atomics.load(w, L.OFF_RSP_EVENT / 4);
    return ((next - event) >>> 0) < ((next - old) >>> 0);
  }

  /**
   * Whether the frontend waits to be notified of the next response (its rsp_event is past the
   * responses published so far): it sleeps, rather than looking at the ring.
   */
  frontendWaits(): boolean {
    const w = this.#words;
    return ((Atomics.load(w, L.OFF_RSP_EVENT / 4) - Atomics.load(w, L.OFF_RSP_PROD / 4)) | 0) > 0;
  }

  /** RING_FINAL_CHECK_FOR_REQUESTS: true if there is work; otherwise asks to be notified. */
  finalCheck(): boolean {
    if (this.unconsumed() > 0) return true;
    Atomics.store(this.#words, L.OFF_REQ_EVENT / 4, (this.#reqCons + 1) >>> 0);
    fullBarrier(); // the event before reading the producer again
    return this.unconsumed() > 0;
  }
}
