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

export class OpStats {
  requests = 0;
  bytes = 0;
  errors = 0;
  readonly #histogram = new Float64Array(BUCKETS);
  #started = 0;
  #timed = 0;

  /** When a request starts: its start time if it is one of those timed, else -1. */
  start(): number {
    return this.#started++ % SAMPLE_EVERY === 0 ? performance.now() : -1;
  }

  /** When a request ends, with what start() returned. */
  end(start: number, bytes: number, failed: boolean): void {
    this.record(start < 0 ? -1 : (performance.now() - start) * 1000, bytes, failed);
  }

  /** Counts a request; `micros` < 0: not timed. */
  record(micros: number, bytes: number, failed: boolean): void {
    this.requests++;
    if (failed) this.errors++;
    else this.bytes += bytes;
    if (micros < 0) return;
    this.#timed++;
    this.#histogram[bucketOf(micros)]++;
  }

  /** The latency (µs) below which `fraction` of the timed requests completed; 0 when none did. */
  percentile(fraction: number): number {
    if (this.#timed === 0) return 0;
    const rank = Math.ceil(fraction * this.#timed);
    let seen = 0;
    for (let b = 0; b < BUCKETS; b++) {
      seen += this.#histogram[b];
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
