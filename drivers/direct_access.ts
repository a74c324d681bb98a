/**
 * DirectAccess: a raw disk's file lent to other threads (FUSE I/O threads, fuse/io_threads.ts),
 * which read and write it themselves with plain pread/pwrite, next to the disk's own I/O engine.
 * It holds its own descriptor of the file (a dup, so the disk closing cannot hand the number to
 * another file under a thread), a fence in shared memory that the threads check around each
 * request, and the threads' read and write counters.
 *
 * The fence is a state word and an in-flight count. A thread adds itself to the count, then
 * does the request only if the state is OPEN (else it hands the request back to the main thread,
 * where the disk's front holds it). hold() sets the state, then waits for the count to reach 0:
 * with sequentially consistent atomics, a request either is seen in flight or sees the state.
 */
import type { FileHandle } from "../ffi/file.ts";
import { OpStats, STATS_CELLS } from "../serve/stats.ts";

export const FENCE = { state: 0, inflight: 1 } as const;
export const FENCE_OPEN = 0, FENCE_HELD = 1, FENCE_CLOSED = 2;

/** Shared memory for one thread's read and write counters. */
export interface StatsArea {
  buffer: SharedArrayBuffer;
  /** Byte offset of the read counters; the write counters follow (STATS_CELLS each). */
  at: number;
}

export class DirectAccess implements Disposable {
  readonly #file: FileHandle;
  /** Bytes of the disk; requests past it are not for the threads. */
  readonly size: number;
  /** Offsets and lengths the threads serve are multiples of this; others go to the disk. */
  readonly alignment: number;
  readonly fence = new Int32Array(new SharedArrayBuffer(8));
  readonly #areas: StatsArea[] = [];
  readonly #onDispose: (() => void)[] = [];
  #disposed = false;

  constructor(file: FileHandle, size: number, alignment: number) {
    this.#file = file.duplicate();
    this.size = size;
    this.alignment = alignment;
  }

  /** The descriptor the threads use; valid until dispose. */
  get fd(): number {
    return this.#file.fd;
  }

  /** Counters for one more thread. */
  statsArea(): StatsArea {
    const area = { buffer: new SharedArrayBuffer(2 * STATS_CELLS * 8), at: 0 };
    this.#areas.push(area);
    return area;
  }

  /** The threads' reads (`write` false) or writes so far. */
  stats(write: boolean): OpStats {
    let sum = new OpStats();
    for (const { buffer, at } of this.#areas) {
      const from = at + (write ? STATS_CELLS * 8 : 0);
      sum = sum.plus(new OpStats(new Float64Array(buffer, from, STATS_CELLS)));
    }
    return sum;
  }

  /** Requests the threads are doing now. */
  get inflight(): number {
    return Atomics.load(this.fence, FENCE.inflight);
  }

  /** The threads do no new request (they hand them back) and those in flight have finished. */
  async hold(): Promise<void> {
    if (Atomics.load(this.fence, FENCE.state) === FENCE_OPEN) {
      Atomics.store(this.fence, FENCE.state, FENCE_HELD);
    }
    for (;;) {
      const n = Atomics.load(this.fence, FENCE.inflight);
      if (n === 0) return;
      // Threads wake waiters only when the count reaches 0; look again every few ms meanwhile.
      await Atomics.waitAsync(this.fence, FENCE.inflight, n, 5).value;
    }
  }

  /** The threads may serve requests again (not after close). */
  open(): void {
    Atomics.compareExchange(this.fence, FENCE.state, FENCE_HELD, FENCE_OPEN);
  }

  /** For good: the threads hand every request back; resolves once none is in flight. */
  close(): Promise<void> {
    Atomics.store(this.fence, FENCE.state, FENCE_CLOSED);
    return this.hold();
  }

  /** Runs `fn` once the threads are done with the descriptor (at dispose). */
  whenDisposed(fn: () => void): void {
    this.#onDispose.push(fn);
  }

  /** Closes the descriptor: only once no thread can use it any more. */
  [Symbol.dispose](): void {
    if (this.#disposed) return;
    this.#disposed = true;
    this.#file.close();
    for (const fn of this.#onDispose) fn();
  }
}
