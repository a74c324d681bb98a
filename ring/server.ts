/**
 * Serves one disk (a BlockTarget) on one blkif ring, whatever carries the ring (the local memfd transport, the
 * blktap device). Requests are copied out, validated, and run concurrently on the disk (segments
 * become views straight into the shared data pages, so O_DIRECT I/O lands in them without a
 * copy); responses are pushed in batches, one notification per batch when the frontend asked.
 */
import type { BlockTarget } from "../drivers/target.ts";
import {
  BackRing,
  BLKIF_LAYOUT,
  BLKIF_OP_DISCARD,
  BLKIF_OP_FLUSH_DISKCACHE,
  BLKIF_OP_INDIRECT,
  BLKIF_OP_READ,
  BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER,
  BLKIF_RSP_EOPNOTSUPP,
  BLKIF_RSP_ERROR,
  BLKIF_RSP_OKAY,
  type BlkifRequest,
} from "./blkif.ts";

/** What a ring's carrier provides. */
export interface RingTransport {
  /** The shared ring page. */
  readonly ring: Uint8Array;
  /** The data pages segments refer to (page `gref` at `gref × 4096`). */
  readonly data: Uint8Array;
  /** Waits for a kick from the frontend; false once the frontend is gone or the ring stops. */
  waitKick(): Promise<boolean>;
  /** Kicks the frontend. */
  notify(): void;
}

const SECTOR = 512;
const PAGE = BLKIF_LAYOUT.PAGE_SIZE;

/** Counters a ring keeps (for logs and `tapd ctl stats` later). */
export interface RingStats {
  requests: number;
  errors: number;
}

export class RingServer {
  readonly stats: RingStats = { requests: 0, errors: 0 };
  readonly #disk: BlockTarget;
  readonly #t: RingTransport;
  readonly #ring: BackRing;
  readonly #dataPages: number;
  #inflight = 0;
  #drained: (() => void) | null = null;
  #pushScheduled = false;
  #stopping = false;

  constructor(disk: BlockTarget, transport: RingTransport, initialise: boolean) {
    this.#disk = disk;
    this.#t = transport;
    this.#ring = new BackRing(transport.ring);
    if (initialise) this.#ring.initShared();
    this.#dataPages = Math.floor(transport.data.length / PAGE);
  }

  /** Serves until the frontend goes away or stop() is called; then waits for requests in flight. */
  async run(): Promise<void> {
    const ring = this.#ring;
    for (;;) {
      while (!this.#stopping && ring.unconsumed() > 0) this.#dispatch(ring.take());
      if (this.#stopping) break;
      if (ring.finalCheck()) continue;
      if (!(await this.#t.waitKick())) break;
    }
    if (this.#inflight > 0) await new Promise<void>((resolve) => this.#drained = resolve);
  }

  /** Stops taking requests (those in flight still complete); the transport must wake waitKick. */
  stop(): void {
    this.#stopping = true;
  }

  #dispatch(req: BlkifRequest): void {
    this.#inflight++;
    this.stats.requests++;
    let work: Promise<void>;
    try {
      work = this.#execute(req);
    } catch (e) {
      work = Promise.reject(e);
    }
    work.then(
      () => this.#complete(req, BLKIF_RSP_OKAY),
      (e) => this.#complete(req, e instanceof Unsupported ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR),
    );
  }

  #complete(req: BlkifRequest, status: number): void {
    if (status !== BLKIF_RSP_OKAY) this.stats.errors++;
    this.#ring.respond(req, status);
    if (!this.#pushScheduled) {
      this.#pushScheduled = true;
      queueMicrotask(this.#push);
    }
    if (--this.#inflight === 0 && this.#drained !== null) this.#drained();
  }

  #push = (): void => {
    this.#pushScheduled = false;
    if (this.#ring.pushResponses()) this.#t.notify();
  };

  /** Runs one request; throws (Malformed/Unsupported or the disk's error) for an error response. */
  #execute(req: BlkifRequest): Promise<void> {
    const disk = this.#disk;
    switch (req.operation) {
      case BLKIF_OP_READ:
      case BLKIF_OP_WRITE: {
        const { offset, bufs } = this.#segments(req, 1);
        return req.operation === BLKIF_OP_READ ? disk.read(offset, bufs) : disk.write(offset, bufs);
      }
      case BLKIF_OP_FLUSH_DISKCACHE:
        return disk.flush();
      case BLKIF_OP_WRITE_BARRIER: {
        if (req.nrSegments === 0) return disk.flush();
        const { offset, bufs } = this.#segments(req, 1);
        return disk.flush().then(() => disk.write(offset, bufs)).then(() => disk.flush());
      }
      case BLKIF_OP_DISCARD: {
        const offset = req.sector * SECTOR, length = req.nrSectors * SECTOR;
        if (length === 0) return Promise.resolve();
        return disk.discard(offset, length);
      }
      case BLKIF_OP_INDIRECT:
        throw new Unsupported("indirect requests");
      default:
        throw new Malformed(`operation ${req.operation}`);
    }
  }

  /** Views into the data pages for a read/write, after checking every segment. */
  #segments(req: BlkifRequest, min: number): { offset: number; bufs: Uint8Array[] } {
    const n = req.nrSegments;
    if (n < min || n > BLKIF_LAYOUT.MAX_SEGMENTS) throw new Malformed(`${n} segments`);
    const bufs: Uint8Array[] = [];
    const s = req.segments, data = this.#t.data;
    for (let i = 0; i < n; i++) {
      const gref = s[i * 3], first = s[i * 3 + 1], last = s[i * 3 + 2];
      if (gref >= this.#dataPages || first > last || last >= PAGE / SECTOR) {
        throw new Malformed(`segment ${i}: page ${gref}, sectors ${first}..${last}`);
      }
      bufs.push(data.subarray(gref * PAGE + first * SECTOR, gref * PAGE + (last + 1) * SECTOR));
    }
    return { offset: req.sector * SECTOR, bufs };
  }
}

class Malformed extends Error {}
class Unsupported extends Error {}
