/**
 * Serves one disk (a BlockTarget) on one blkif ring, whatever carries the ring (the local memfd
 * transport, the blktap device, a Xen guest through grant copy). Requests are copied out,
 * validated on the copy, and run concurrently on the disk with buffers from the carrier's
 * SegmentData (views straight into shared data pages on the local transport, so O_DIRECT I/O
 * lands in them without a copy); responses are pushed in batches, one notification per batch
 * when the frontend asked (a batch is an event-loop turn's responses while the frontend sleeps,
 * each response as it comes while the frontend looks at the ring).
 */
import type { BlockTarget } from "../drivers/target.ts";
import type { Buffers } from "../io/engine.ts";
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
import type { SegmentData } from "./segments.ts";
import { setImmediate } from "node:timers";
import { PollWindow } from "../io/poll_window.ts";

/** What a ring's carrier provides. */
export interface RingTransport {
  /** The shared ring (one or more contiguous pages). */
  readonly ring: Uint8Array;
  /** Where the segments' data lives. */
  readonly data: SegmentData;
  /** Waits for a kick from the frontend; false once the frontend is gone or the ring stops. */
  waitKick(): Promise<boolean>;
  /** Kicks the frontend. */
  notify(): void;
}

const SECTOR = 512;
const PAGE = BLKIF_LAYOUT.PAGE_SIZE;
const L = BLKIF_LAYOUT;

/** Counters a ring keeps (for logs and `tapd ctl stats`). */
export interface RingStats {
  requests: number;
  errors: number;
}

/** How a ring is served. */
export interface RingServerOptions {
  /** Logs a malformed request. */
  onError?: (message: string) => void;
  /**
   * Keep looking at the ring instead of sleeping until the frontend kicks, until this many µs
   * have passed without a request arriving or completing: CPU for latency (the engine's
   * `pollMicros` does the same for completions).
   */
  pollMicros?: number;
}

/** The ring broke its protocol (e.g. a producer jump): it must be stopped, not served. */
export class RingProtocolError extends Error {}

export class RingServer {
  readonly stats: RingStats = { requests: 0, errors: 0 };
  readonly #disk: BlockTarget;
  readonly #t: RingTransport;
  readonly #ring: BackRing;
  readonly #sectors: number;
  #inflight = 0;
  #drained: (() => void) | null = null;
  #loopEnded: (() => void) | null = null;
  /** Why waiting for a kick failed (the transport broke), thrown by run() after the drain. */
  #waitError: unknown = undefined;
  #pushScheduled = false;
  /** run() has drained and pushed the last responses. */
  #finished = false;
  #stopping = false;
  #broken: RingProtocolError | null = null;
  /** The loop runs: requests may be taken (also after a push of responses). */
  #taking = false;
  #onError: (message: string) => void;
  /** Polling (--poll-us): looks for requests until a while has passed without activity. */
  readonly #poll: PollWindow | null;

  constructor(
    disk: BlockTarget,
    transport: RingTransport,
    initialise: boolean,
    options: RingServerOptions = {},
  ) {
    this.#disk = disk;
    this.#t = transport;
    this.#ring = new BackRing(transport.ring);
    if (initialise) this.#ring.initShared();
    this.#sectors = Math.floor(disk.size / SECTOR);
    this.#onError = options.onError ?? (() => {});
    this.#poll = options.pollMicros ? new PollWindow(options.pollMicros) : null;
  }

  /** Entries in the ring. */
  get ringSize(): number {
    return this.#ring.size;
  }

  /**
   * Serves until the frontend goes away or stop() is called; then waits for requests in flight.
   * Throws RingProtocolError (after the drain) if the frontend broke the ring protocol.
   */
  async run(): Promise<void> {
    this.#taking = true;
    await new Promise<void>((resolve) => {
      this.#loopEnded = resolve;
      this.#look();
    });
    this.#taking = false; // from here on only requests in flight finish
    if (this.#inflight > 0) await new Promise<void>((resolve) => this.#drained = resolve);
    // The last responses go out now: a push scheduled for a later turn may find the ring gone.
    this.#finished = true;
    this.#publish();
    if (this.#broken !== null) throw this.#broken;
    if (this.#waitError !== undefined) throw this.#waitError;
  }

  /**
   * One turn of the serving loop, as a callback (a poll look allocates nothing): take what the
   * frontend published, then look again (polling) or sleep until it kicks.
   */
  #look = (): void => {
    const ring = this.#ring;
    for (;;) {
      this.#take();
      if (this.#stopping || this.#broken !== null) return this.#loopEnded!();
      // While polling, req_event is left behind, so the frontend does not kick either.
      const poll = this.#poll;
      if (poll?.keepLooking()) return poll.schedule(this.#look);
      if (!ring.finalCheck()) break;
    }
    this.#t.waitKick().then(this.#kicked, this.#waitFailed);
  };

  #waitFailed = (e: unknown): void => {
    this.#waitError = e;
    this.#loopEnded!();
  };

  #kicked = (more: boolean): void => {
    if (more) this.#look();
    else this.#loopEnded!();
  };

  /**
   * Dispatches every request the frontend has published. Called by the loop above after a
   * kick, and after each push of responses: a frontend that is busy answering them publishes
   * new requests meanwhile, and they start without waiting for the kick to wake the loop.
   */
  #take(): void {
    const ring = this.#ring;
    if (this.#broken !== null) return;
    if (ring.producerOverflow()) {
      // Seen by the loop when it next wakes; nothing more is taken from this ring.
      this.#broken = new RingProtocolError(
        "the frontend published more requests than the ring holds",
      );
      return;
    }
    if (this.#stopping || ring.unconsumed() === 0) return;
    while (!this.#stopping && ring.unconsumed() > 0) this.#dispatch(ring.take());
    this.#poll?.touch();
  }

  /** Stops taking requests (those in flight still complete); the transport must wake waitKick. */
  stop(): void {
    this.#stopping = true;
  }

  #dispatch(req: BlkifRequest): void {
    this.#inflight++;
    this.stats.requests++;
    let work: Promise<void> | null;
    try {
      work = this.#execute(req);
    } catch (e) {
      work = Promise.reject(e);
    }
    work?.then(() => this.#complete(req, BLKIF_RSP_OKAY), (e) => this.#fail(req, e));
  }

  #settle(req: BlkifRequest, error: Error | null): void {
    if (error === null) this.#complete(req, BLKIF_RSP_OKAY);
    else this.#fail(req, error);
  }

  #fail(req: BlkifRequest, e: unknown): void {
    if (e instanceof Malformed) this.#onError((e as Error).message);
    this.#complete(req, e instanceof Unsupported ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR);
  }

  #complete(req: BlkifRequest, status: number): void {
    if (status !== BLKIF_RSP_OKAY) this.stats.errors++;
    this.#ring.respond(req, status);
    if (!this.#pushScheduled) {
      this.#pushScheduled = true;
      // A frontend asleep until notified is woken once, with everything that completes in this
      // event-loop turn (fewer wake-ups at both ends: +8% random 4k reads on the local ring);
      // one that looks at the ring gets each response as soon as it is ready.
      if (this.#ring.frontendWaits()) setImmediate(this.#push);
      else queueMicrotask(this.#push);
    }
    this.#poll?.touch();
    if (--this.#inflight === 0 && this.#drained !== null) this.#drained();
  }

  #push = (): void => {
    this.#pushScheduled = false;
    if (this.#finished) return;
    this.#publish();
    if (this.#taking) this.#take();
  };

  /** Publishes the responses written so far, notifying the frontend if it asked. */
  #publish(): void {
    if (this.#ring.pushResponses()) this.#t.notify();
  }

  /**
   * Runs one request; throws (Malformed/Unsupported or the disk's error) for an error response.
   * Reads and writes, the hot path, return null: they settle through a callback, without the
   * promises of every layer between here and the engine.
   */
  #execute(req: BlkifRequest): Promise<void> | null {
    const disk = this.#disk;
    switch (req.operation) {
      case BLKIF_OP_READ:
      case BLKIF_OP_WRITE: {
        const write = req.operation === BLKIF_OP_WRITE;
        this.#transfer(req, req.segments, this.#direct(req, 1), write, (e) => this.#settle(req, e));
        return null;
      }
      case BLKIF_OP_INDIRECT: {
        if (req.responseOp !== BLKIF_OP_READ && req.responseOp !== BLKIF_OP_WRITE) {
          throw new Malformed(`indirect operation ${req.responseOp}`);
        }
        const segs = this.#indirectSegments(req), write = req.responseOp === BLKIF_OP_WRITE;
        this.#transfer(req, segs, req.nrSegments, write, (e) => this.#settle(req, e));
        return null;
      }
      case BLKIF_OP_FLUSH_DISKCACHE: {
        // A flush may carry data (written first); it completes once every completed write is durable.
        if (req.nrSegments === 0) return disk.flush();
        return this.#written(req, this.#direct(req, 1)).then(() => disk.flush());
      }
      case BLKIF_OP_WRITE_BARRIER: {
        if (req.nrSegments === 0) return disk.flush();
        const n = this.#direct(req, 1);
        return disk.flush().then(() => this.#written(req, n)).then(() => disk.flush());
      }
      case BLKIF_OP_DISCARD: {
        if (req.nrSectors === 0) return Promise.resolve();
        this.#checkRange(req.sector, req.nrSectors);
        return disk.discard(req.sector * SECTOR, req.nrSectors * SECTOR);
      }
      default:
        throw new Unsupported(`operation ${req.operation}`);
    }
  }

  /** Writes a request's `n` direct segments (the data of a flush or barrier). */
  #written(req: BlkifRequest, n: number): Promise<void> {
    return new Promise((resolve, reject) =>
      this.#transfer(req, req.segments, n, true, (e) => e === null ? resolve() : reject(e))
    );
  }

  /** The segment count of a direct request, checked. */
  #direct(req: BlkifRequest, min: number): number {
    const n = req.nrSegments;
    if (n < min || n > L.MAX_SEGMENTS) throw new Malformed(`${n} segments`);
    return n;
  }

  /** Reads an INDIRECT request's segment descriptors out of its pages (copied, then parsed). */
  #indirectSegments(req: BlkifRequest): Uint32Array {
    const n = req.nrSegments, max = this.#t.data.maxIndirectSegments;
    if (max === 0) throw new Unsupported("indirect requests");
    if (n < 1 || n > max) throw new Malformed(`indirect request with ${n} segments (max ${max})`);
    const pages = Math.ceil(n / L.SEGMENTS_PER_INDIRECT_PAGE);
    let bytes: Uint8Array;
    try {
      bytes = this.#t.data.indirectPages(req.indirectGrefs, pages);
    } catch (e) {
      throw new Malformed((e as Error).message);
    }
    if (req.indirectSegments.length < n * 3) req.indirectSegments = new Uint32Array(max * 3);
    const segs = req.indirectSegments;
    for (let i = 0; i < n; i++) {
      const at = i * L.SEGMENT_SIZE;
      segs[i * 3] = bytes[at + L.OFF_SEG_GREF] | bytes[at + L.OFF_SEG_GREF + 1] << 8 |
        bytes[at + L.OFF_SEG_GREF + 2] << 16 | bytes[at + L.OFF_SEG_GREF + 3] << 24;
      segs[i * 3 + 1] = bytes[at + L.OFF_SEG_FIRST_SECT];
      segs[i * 3 + 2] = bytes[at + L.OFF_SEG_LAST_SECT];
    }
    return segs;
  }

  /**
   * Checks `n` segments and the disk range they cover (throwing), then moves the data; `done`
   * gets the outcome.
   */
  #transfer(
    req: BlkifRequest,
    segs: Uint32Array,
    n: number,
    write: boolean,
    done: (error: Error | null) => void,
  ): void {
    let sectors = 0;
    for (let i = 0; i < n; i++) {
      const first = segs[i * 3 + 1], last = segs[i * 3 + 2];
      if (first > last || last >= PAGE / SECTOR) {
        throw new Malformed(`segment ${i}: sectors ${first}..${last}`);
      }
      sectors += last - first + 1;
    }
    this.#checkRange(req.sector, sectors);
    if (write && this.#disk.info.readOnly) throw new ReadOnly("write to a read-only disk");
    const data = this.#t.data;
    let bufs: Buffers;
    try {
      bufs = data.acquire(segs, n, write);
    } catch (e) {
      throw new Malformed((e as Error).message);
    }
    this.#disk.submit(write, req.sector * SECTOR, bufs, (error) => {
      try {
        data.release(bufs, segs, n, !write && error === null);
      } catch (e) {
        return done(error ?? new Malformed((e as Error).message));
      }
      done(error);
    });
  }

  /** Overflow-safe: `count` sectors from `sector` lie on the disk. */
  #checkRange(sector: number, count: number): void {
    if (sector > this.#sectors || count > this.#sectors - sector) {
      throw new Malformed(`sectors ${sector}+${count} beyond the disk's ${this.#sectors}`);
    }
  }
}

class Malformed extends Error {}
class Unsupported extends Error {}
class ReadOnly extends Error {}
