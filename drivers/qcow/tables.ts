/**
 * qcow's two-level table: the L1 table (kept whole in memory, in its on-disk byte form so that a
 * changed entry's sector can be written straight from it) and a cache of L2 tables. Entries are
 * big-endian u64; they are decoded as two u32 halves, with no BigInt on the hot path.
 */
/** What an L2 entry says about one cluster. */
export const enum Kind {
  Unallocated,
  Normal,
  Compressed,
}

const TWO32 = 0x100000000;

/** Reads the big-endian u64 at `off` of `v` as a number (host offsets are far below 2^53). */
export function getEntry(v: DataView, off: number): number {
  return v.getUint32(off) * TWO32 + v.getUint32(off + 4);
}

export function setEntry(v: DataView, off: number, value: number): void {
  v.setUint32(off, Math.floor(value / TWO32));
  v.setUint32(off + 4, value % TWO32);
}

/**
 * An in-memory L2 table, the bytes as on disk. Plain JS memory (collected when evicted); the
 * engine copies the few sectors written back through pool memory.
 */
export class L2Table {
  readonly offset: number;
  readonly bytes: Uint8Array;
  readonly view: DataView;

  constructor(offset: number, bytes: Uint8Array) {
    this.offset = offset;
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
  }

  entry(index: number): number {
    return getEntry(this.view, index * 8);
  }
}

/** Classifies a raw entry (as a number whose top bit is the compressed flag). */
export function kindOf(entry: number): Kind {
  if (entry === 0) return Kind.Unallocated;
  return entry >= 2 ** 63 ? Kind.Compressed : Kind.Normal;
}

/** A compressed entry's host offset and byte length (spec §1.4). */
export function compressedExtent(
  v: DataView,
  off: number,
  clusterBits: number,
): { offset: number; length: number } {
  const e = v.getBigUint64(off);
  const shift = BigInt(63 - clusterBits);
  return {
    offset: Number(e & ((1n << shift) - 1n)),
    length: Number((e >> shift) & ((1n << BigInt(clusterBits)) - 1n)),
  };
}

/**
 * A bounded cache of L2 tables (first in, first out) with de-duplicated loads. A table written
 * by an allocation is marked with `written()`: a load that started before is then discarded and
 * redone, so a stale copy from disk can never replace the one being updated.
 */
export class L2Cache {
  readonly #tables = new Map<number, L2Table>();
  readonly #loading = new Map<number, Promise<L2Table>>();
  readonly #generation = new Map<number, number>();
  readonly #capacity: number;

  constructor(capacity: number) {
    this.#capacity = Math.max(capacity, 4);
  }

  /** The table at `offset`, loading it with `load` on a miss. */
  get(offset: number, load: () => Promise<L2Table>): L2Table | Promise<L2Table> {
    const hit = this.#tables.get(offset);
    if (hit !== undefined) return hit;
    let pending = this.#loading.get(offset);
    if (pending === undefined) {
      pending = this.#load(offset, load).finally(() => this.#loading.delete(offset));
      this.#loading.set(offset, pending);
    }
    return pending;
  }

  async #load(offset: number, load: () => Promise<L2Table>): Promise<L2Table> {
    for (;;) {
      const generation = this.#generation.get(offset) ?? 0;
      const table = await load();
      const current = this.#tables.get(offset);
      if (current !== undefined) return current;
      if ((this.#generation.get(offset) ?? 0) === generation) {
        this.#put(table);
        return table;
      }
    }
  }

  /** Records that `table` (the caller's up-to-date copy) was changed and written. */
  written(table: L2Table): void {
    this.#generation.set(table.offset, (this.#generation.get(table.offset) ?? 0) + 1);
    this.#put(table);
  }

  #put(table: L2Table): void {
    this.#tables.delete(table.offset);
    this.#tables.set(table.offset, table);
    if (this.#tables.size > this.#capacity) {
      // A caller still holding an evicted table keeps a valid object; it just leaves the cache.
      this.#tables.delete(this.#tables.keys().next().value!);
    }
  }
}
