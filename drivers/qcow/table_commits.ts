/**
 * Group commit of one table's entries (an L2 table, or the L1 table's sectors): only one write of
 * a table is in flight at a time (two
 * writes of the same sector in flight together may land in either order); entries set while one
 * is in flight go out together in the next. An entry becomes visible in the in-memory table only
 * when the write that carries it is issued, so whatever a reader or an in-place writer can see is
 * already on its way to the file (a kill -9 cannot lose it).
 */
import { getEntry, setEntry } from "./tables.ts";

/** A table of big-endian u64 entries as on disk: an L2Table, or the L1 table's sectors. */
export interface EntryTable {
  readonly offset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;
}

/** Writes bytes [lo, hi) of `table` (its sectors) to the file. */
export type WriteTableBytes<T extends EntryTable> = (
  table: T,
  lo: number,
  hi: number,
) => Promise<void>;

interface Waiter {
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class TableCommits<T extends EntryTable> {
  readonly table: T;
  readonly #write: WriteTableBytes<T>;
  readonly #idle: () => void;
  #positions: number[] = [];
  #values: number[] = [];
  #waiters: Waiter[] = [];
  #running: Promise<void> | null = null;

  /** `idle` is called when nothing is queued or in flight any more. */
  constructor(table: T, write: WriteTableBytes<T>, idle: () => void) {
    this.table = table;
    this.#write = write;
    this.#idle = idle;
  }

  /** Sets entries (flat pairs: byte position in the table, value); resolves once a write carrying them is done. */
  set(pairs: readonly number[]): Promise<void> {
    for (let k = 0; k < pairs.length; k += 2) {
      this.#positions.push(pairs[k]);
      this.#values.push(pairs[k + 1]);
    }
    const done = new Promise<void>((resolve, reject) => this.#waiters.push({ resolve, reject }));
    this.#running ??= this.#run();
    return done;
  }

  /** Settles when every write queued so far is done (or has failed). */
  settled(): Promise<void> {
    return this.#running ?? Promise.resolve();
  }

  async #run(): Promise<void> {
    await Promise.resolve(); // let the rest of this turn's entries join the first write
    const view = this.table.view;
    while (this.#waiters.length > 0) {
      const positions = this.#positions, values = this.#values, waiters = this.#waiters;
      this.#positions = [], this.#values = [], this.#waiters = [];
      const old: number[] = [];
      let lo = Infinity, hi = -Infinity;
      for (let k = 0; k < positions.length; k++) {
        const at = positions[k];
        old.push(getEntry(view, at));
        setEntry(view, at, values[k]);
        lo = Math.min(lo, at);
        hi = Math.max(hi, at + 8);
      }
      try {
        await this.#write(this.table, lo, hi);
        for (const w of waiters) w.resolve();
      } catch (e) {
        // The file keeps the old entries: so does memory.
        for (let k = positions.length - 1; k >= 0; k--) setEntry(view, positions[k], old[k]);
        for (const w of waiters) w.reject(e);
      }
    }
    this.#running = null;
    this.#idle();
  }
}
