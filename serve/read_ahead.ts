/**
 * ReadAhead: reads ahead of sequential readers, in front of a disk. When a large read continues
 * where an earlier one ended, the next few windows of the disk are read into memory, and later
 * reads that they cover are answered from there (a copy instead of a wait for the disk). A
 * reader behind a loop device sends its read-ahead a few requests at a time and waits for them;
 * with the windows already read, each of its requests costs the copy only.
 *
 * Coherence: every change to the disk (write, discard, write-zeroes) drops the windows it
 * overlaps when it starts and again when it ends, so a read that arrives after a change was
 * acknowledged never sees data from before it. Writes that do not pass here (I/O threads, FUSE
 * passthrough, another process) would not: the owner turns read-ahead off for such disks.
 */
import type { DiskDone } from "../drivers/driver.ts";
import { type Buffers, byteLength } from "../io/engine.ts";
import { type BufferPool, pooledSize, sharedPool } from "../io/buffer_pool.ts";

/** Reads smaller than this neither start nor advance read-ahead. */
const MIN_REQUEST = 128 * 1024;
const MAX_WINDOW = 1024 * 1024;
/**
 * How far ahead of a reader windows are read, by default: twice its request at first, doubling
 * with each request that continues, up to this (16 MiB read bonnie++'s block input 10-25% faster
 * than 4 MiB through a loop device; docs/performance.md). All windows together stay within
 * twice this.
 */
export const MAX_AHEAD = 16 * 1024 * 1024;
/** Sequential readers followed at once. */
const STREAMS = 4;
/** Where windows may start and end: a multiple of any disk's logical sector. */
const ALIGN = 4096;

/** Reads from the disk itself (into a caller's buffers, or a window). */
export type ReadIssuer = (offset: number, bufs: Buffers, done: DiskDone) => void;

interface Window {
  offset: number;
  end: number;
  buf: Uint8Array<ArrayBuffer>;
  loading: boolean;
  failed: boolean;
  /** Taken out of the list (consumed, evicted, failed or overlapped by a change). */
  dropped: boolean;
  /** Overlapped by a change: readers waiting for it read the disk instead. */
  stale: boolean;
  /** Reads about to copy from it. */
  holds: number;
  given: boolean;
  waiters: (() => void)[];
}

interface Stream {
  /** Where the reader's last request ended. */
  next: number;
  /** Where its windows end. */
  ahead: number;
  /** How far ahead of `next` windows are kept. */
  span: number;
}

export interface ReadAheadStats {
  /** Reads answered from windows. */
  hits: number;
  /** Bytes read into windows. */
  fetchedBytes: number;
}

export class ReadAhead {
  readonly #read: ReadIssuer;
  readonly #fetch: ReadIssuer;
  readonly #size: number;
  readonly #pool: BufferPool;
  readonly #maxAhead: number;
  readonly #budget: number;
  /** In the order they were started. */
  #windows: Window[] = [];
  /** Windows being read, in the list or not (readers may wait for one that was consumed). */
  readonly #loading = new Set<Window>();
  /** Bytes of window buffers out of the pool. */
  #bytes = 0;
  /** Most recently used last. */
  #streams: Stream[] = [];
  #hits = 0;
  #fetched = 0;

  /**
   * `read` serves a request the windows do not cover; `fetch` fills a window (both read the
   * disk; they differ only in how the owner counts them). `size` is the disk's size.
   */
  constructor(
    read: ReadIssuer,
    fetch: ReadIssuer,
    size: number,
    options: { maxAhead?: number; pool?: BufferPool } = {},
  ) {
    this.#read = read;
    this.#fetch = fetch;
    this.#size = size;
    this.#maxAhead = options.maxAhead ?? MAX_AHEAD;
    this.#budget = 2 * this.#maxAhead;
    this.#pool = options.pool ?? sharedPool;
  }

  /** Reads [offset, offset + length of bufs), from windows when they cover it. */
  read(offset: number, bufs: Buffers, done: DiskDone): void {
    const length = byteLength(bufs);
    const end = offset + length;
    const cover = this.#covering(offset, end);
    if (cover === null) this.#read(offset, bufs, done);
    else this.#serve(cover, offset, end, bufs, done);
    if (length >= MIN_REQUEST) this.#follow(offset, end);
  }

  /**
   * Serves [offset, end) in place when loaded windows cover it: `use` gets views of the window
   * memory, in order, and must be done with them when it returns (a reply written from them
   * with writev: no copy here). False, with nothing done, when the windows do not cover it or
   * are still loading; read() then serves it.
   */
  peek(offset: number, end: number, use: (parts: Uint8Array[]) => void): boolean {
    const cover = this.#covering(offset, end);
    if (cover === null) return false;
    for (const w of cover) if (w.loading || w.stale || w.failed) return false;
    // A few views per hit of 128 KiB or more, against the copy of the whole request they save.
    // Windows may overlap (two readers, or a window started again): take each byte once.
    const parts: Uint8Array[] = [];
    for (let at = offset; at < end;) {
      const w = cover.find((c) => c.offset <= at && c.end > at)!;
      const to = Math.min(end, w.end);
      parts.push(w.buf.subarray(at - w.offset, to - w.offset));
      at = to;
    }
    use(parts);
    this.#hits++;
    this.#passed(cover, end);
    if (end - offset >= MIN_REQUEST) this.#follow(offset, end);
    return true;
  }

  /** A change to [offset, end) starts or ends: windows over it are dropped. */
  changed(offset: number, end: number): void {
    for (const w of this.#loading) if (w.offset < end && w.end > offset) w.stale = true;
    if (this.#windows.length === 0) return;
    this.#windows = this.#windows.filter((w) => {
      if (w.end <= offset || w.offset >= end) return true;
      w.stale = true;
      this.#release(w);
      return false;
    });
  }

  /** Drops every window and forgets the readers (the disk was switched, or is closing). */
  clear(): void {
    for (const w of this.#loading) w.stale = true;
    for (const w of this.#windows) {
      w.stale = true;
      this.#release(w);
    }
    this.#windows = [];
    this.#streams = [];
  }

  stats(): ReadAheadStats {
    return { hits: this.#hits, fetchedBytes: this.#fetched };
  }

  /** The windows that cover [offset, end) between them, in order, or null. */
  #covering(offset: number, end: number): Window[] | null {
    // The common miss (random reads, windows elsewhere) costs a scan and no allocation.
    let overlaps = false;
    for (const w of this.#windows) if (w.offset < end && w.end > offset) overlaps = true;
    if (!overlaps) return null;
    const found = this.#windows.filter((w) => w.offset < end && w.end > offset);
    found.sort((a, b) => a.offset - b.offset);
    let at = offset;
    for (const w of found) {
      if (w.offset > at) return null;
      at = Math.max(at, w.end);
    }
    return at >= end ? found : null;
  }

  #serve(cover: Window[], offset: number, end: number, bufs: Buffers, done: DiskDone): void {
    let waiting = 0;
    for (const w of cover) {
      w.holds++;
      if (w.loading) waiting++;
    }
    const answer = (): boolean => {
      const fresh = !cover.some((w) => w.failed || w.stale);
      if (fresh) {
        this.#copy(cover, offset, bufs);
        this.#hits++;
      }
      for (const w of cover) {
        w.holds--;
        this.#giveBack(w);
      }
      return fresh;
    };
    if (waiting === 0) {
      answer();
      queueMicrotask(() => done(null));
    } else {
      const settled = (): void => {
        if (--waiting > 0) return;
        if (answer()) done(null);
        else this.#read(offset, bufs, done);
      };
      for (const w of cover) if (w.loading) w.waiters.push(settled);
    }
    this.#passed(cover, end);
  }

  /** The reader has moved past the windows of `cover` that end within its read. */
  #passed(cover: Window[], end: number): void {
    this.#windows = this.#windows.filter((w) => {
      if (w.end > end || !cover.includes(w)) return true;
      this.#release(w);
      return false;
    });
  }

  #copy(cover: Window[], offset: number, bufs: Buffers): void {
    let at = offset;
    for (const buf of bufs instanceof Uint8Array ? [bufs] : bufs) {
      let filled = 0;
      while (filled < buf.length) {
        const w = cover.find((c) => c.offset <= at && c.end > at)!;
        const n = Math.min(buf.length - filled, w.end - at);
        buf.set(w.buf.subarray(at - w.offset, at - w.offset + n), filled);
        filled += n;
        at += n;
      }
    }
  }

  /** Follows the reader that a large read continues, and reads ahead of it. */
  #follow(offset: number, end: number): void {
    // Windows are read with O_DIRECT: a reader at unaligned offsets (served in place from
    // windows, at any byte) would start windows the disk refuses.
    if (offset % ALIGN !== 0 || end % ALIGN !== 0) return;
    const i = this.#streams.findIndex((s) => s.next === offset);
    if (i < 0) {
      // A new reader: read-ahead starts once it continues.
      this.#streams.push({ next: end, ahead: end, span: 0 });
      if (this.#streams.length > STREAMS) this.#streams.shift();
      return;
    }
    const s = this.#streams[i];
    this.#streams.splice(i, 1);
    this.#streams.push(s);
    s.next = end;
    const size = Math.min(Math.max(end - offset, MIN_REQUEST), MAX_WINDOW);
    s.span = Math.min(s.span === 0 ? 2 * size : 2 * s.span, this.#maxAhead);
    let from = Math.max(s.ahead, end);
    const limit = Math.min(end + s.span, this.#size);
    while (from < limit) {
      const to = Math.min(from + size, limit);
      // Another reader's window may hold these bytes already (two readers close together).
      if (!this.#held(from, to) && !this.#start(from, to)) break;
      from = to;
    }
    s.ahead = from;
  }

  /** A window in the list holds all of [offset, end). */
  #held(offset: number, end: number): boolean {
    for (const w of this.#windows) if (w.offset <= offset && w.end >= end) return true;
    return false;
  }

  #start(offset: number, end: number): boolean {
    const length = end - offset, cost = pooledSize(length);
    if (this.#bytes + cost > this.#budget && !this.#evict(cost)) return false;
    const w: Window = {
      offset,
      end,
      buf: this.#pool.take(length),
      loading: true,
      failed: false,
      dropped: false,
      stale: false,
      holds: 0,
      given: false,
      waiters: [],
    };
    this.#windows.push(w);
    this.#loading.add(w);
    this.#bytes += cost;
    this.#fetched += length;
    this.#fetch(offset, w.buf, (e) => {
      this.#loading.delete(w);
      w.loading = false;
      w.failed = e !== null;
      const waiters = w.waiters;
      w.waiters = [];
      for (const waiter of waiters) waiter();
      if (w.failed && !w.dropped) {
        this.#windows = this.#windows.filter((x) => x !== w);
        this.#release(w);
      } else this.#giveBack(w);
    });
    return true;
  }

  /** Makes room by dropping the oldest loaded windows; false when what loads fills the budget. */
  #evict(cost: number): boolean {
    for (let i = 0; i < this.#windows.length && this.#bytes + cost > this.#budget;) {
      const w = this.#windows[i];
      if (w.loading) {
        i++;
        continue;
      }
      this.#windows.splice(i, 1);
      this.#release(w);
    }
    return this.#bytes + cost <= this.#budget;
  }

  /**
   * Takes a window out of use: its buffer goes back now, or once its read has ended and the
   * readers waiting for it have copied from it.
   */
  #release(w: Window): void {
    w.dropped = true;
    this.#giveBack(w);
  }

  #giveBack(w: Window): void {
    if (!w.dropped || w.loading || w.holds > 0 || w.given) return;
    w.given = true;
    this.#bytes -= pooledSize(w.end - w.offset);
    this.#pool.give(w.buf);
  }
}
