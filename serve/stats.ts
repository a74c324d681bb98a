/**
 * Per-operation request statistics for `tapd ctl stats`: counts, bytes, errors, and latency
 * percentiles from a log-linear histogram (8 buckets per power of two of microseconds, so a
 * percentile is within 12.5%), which costs one array increment per request. Latency is sampled:
 * one request in SAMPLE_EVERY is timed, because two clock reads per request were 5% of a ring
 * tapdisk's time at 100k IOPS (Deno's clock is an op).
 */

export const OPS = ["read", "write", "flush", "discard", "writeZeroes", "blockStatus"] as const;
export type Op = typeof OPS[number];

const SUB = 8;
const SAMPLE_EVERY = 8;
const BUCKETS = 64 * SUB;

/** Bucket of a latency in microseconds (≥ 0). */
function bucketOf(micros: number): number {
  const us = Math.floor(micros);
  if (us < SUB) return us;
  const exp = 31 - Math.clz32(us); // ≥ 3
  const sub = (us >>> (exp - 3)) & (SUB - 1);
  return Math.min((exp - 2) * SUB + sub, BUCKETS - 1);
}

/** The lower bound, in microseconds, of a bucket. */
function bucketFloor(bucket: number): number {
  if (bucket < SUB) return bucket;
  const exp = Math.floor(bucket / SUB) + 2;
  return (SUB + (bucket % SUB)) * 2 ** (exp - 3);
}

/** Float64 cells an OpStats keeps: requests, bytes, errors, started, timed, then the histogram. */
export const STATS_CELLS = 5 + BUCKETS;
const REQUESTS = 0, BYTES = 1, ERRORS = 2, STARTED = 3, TIMED = 4, HISTOGRAM = 5;

/**
 * One operation's counters. They live in `cells`, which may be a slice of shared memory written
 * by one other thread (a FUSE I/O thread) and read here: `add` sums such slices into a summary.
 */
export class OpStats {
  readonly #cells: Float64Array;

  constructor(cells: Float64Array = new Float64Array(STATS_CELLS)) {
    if (cells.length !== STATS_CELLS) throw new RangeError("OpStats: wrong number of cells");
    this.#cells = cells;
  }

  get requests(): number {
    return this.#cells[REQUESTS];
  }

  get bytes(): number {
    return this.#cells[BYTES];
  }

  get errors(): number {
    return this.#cells[ERRORS];
  }

  /** When a request starts: its start time if it is one of those timed, else -1. */
  start(): number {
    return this.#cells[STARTED]++ % SAMPLE_EVERY === 0 ? performance.now() : -1;
  }

  /** Takes back a start() whose request did not happen, so the sampling stays even. */
  unstart(): void {
    this.#cells[STARTED]--;
  }

  /** When a request ends, with what start() returned. */
  end(start: number, bytes: number, failed: boolean): void {
    this.record(start < 0 ? -1 : (performance.now() - start) * 1000, bytes, failed);
  }

  /** Counts a request; `micros` < 0: not timed. */
  record(micros: number, bytes: number, failed: boolean): void {
    const c = this.#cells;
    c[REQUESTS]++;
    if (failed) c[ERRORS]++;
    else c[BYTES] += bytes;
    if (micros < 0) return;
    c[TIMED]++;
    c[HISTOGRAM + bucketOf(micros)]++;
  }

  /** A new OpStats holding this one's counts plus `other`'s. */
  plus(other: OpStats): OpStats {
    const sum = new Float64Array(this.#cells);
    const theirs = other.#cells;
    for (let i = 0; i < STATS_CELLS; i++) sum[i] += theirs[i];
    return new OpStats(sum);
  }

  /** The latency (µs) below which `fraction` of the timed requests completed; 0 when none did. */
  percentile(fraction: number): number {
    const c = this.#cells, timed = c[TIMED];
    if (timed === 0) return 0;
    const rank = Math.ceil(fraction * timed);
    let seen = 0;
    for (let b = 0; b < BUCKETS; b++) {
      seen += c[HISTOGRAM + b];
      if (seen >= rank) return bucketFloor(b);
    }
    return bucketFloor(BUCKETS - 1);
  }
}

export interface OpSummary {
  requests: number;
  bytes: number;
  errors: number;
  p50Micros: number;
  p99Micros: number;
}

export function summarize(stats: OpStats): OpSummary {
  return {
    requests: stats.requests,
    bytes: stats.bytes,
    errors: stats.errors,
    p50Micros: stats.percentile(0.5),
    p99Micros: stats.percentile(0.99),
  };
}
