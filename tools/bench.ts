/**
 * `tapd bench`: drives one disk in-process at a fixed queue depth and reports IOPS, throughput and
 * latency percentiles (the peer is `qemu-img bench`; bench/vs_fio.ts compares with fio).
 */
import { openDisk } from "../drivers/mod.ts";
import type { Disk } from "../drivers/disk.ts";
import { sharedPool } from "../io/buffer_pool.ts";
import { ENGINE_KINDS } from "../io/engine.ts";
import {
  parseChoice,
  parseCommandLine,
  parseCount,
  parseCpuList,
  parsePollMicros,
  parseSize,
} from "../cli/args.ts";
import { pinProcess } from "../ffi/process.ts";
import { RingFrontend } from "../ring/frontend.ts";
import { type Command, UsageError } from "../cli/command.ts";
import { ensureDefaultImage } from "./state_dir.ts";

const PATTERNS = ["read", "write", "randread", "randwrite"] as const;
type Pattern = typeof PATTERNS[number];

export interface BenchOptions {
  rw: Pattern;
  bs: number;
  qd: number;
  seconds: number;
  /** The window of the disk to use (default: all of it). */
  offset?: number;
  size?: number;
}

export interface BenchResult {
  spec: string;
  rw: Pattern;
  bs: number;
  qd: number;
  engine: string;
  seconds: number;
  ops: number;
  iops: number;
  mbps: number;
  p50Us: number;
  p99Us: number;
}

/** Latencies in a log-linear histogram: 16 buckets per power of two of nanoseconds (≈4%). */
class Histogram {
  #counts = new Float64Array(64 * 16);
  #n = 0;

  add(ns: number): void {
    const b = ns < 1 ? 0 : Math.min(this.#counts.length - 1, Math.floor(Math.log2(ns) * 16));
    this.#counts[b]++;
    this.#n++;
  }

  /** The value below which `q` of the samples fall, in microseconds. */
  quantile(q: number): number {
    let seen = 0;
    const want = q * this.#n;
    for (let b = 0; b < this.#counts.length; b++) {
      seen += this.#counts[b];
      if (seen >= want && this.#counts[b] > 0) return 2 ** ((b + 0.5) / 16) / 1000;
    }
    return 0;
  }
}

/** What bench drives: an open Disk, or a ring frontend attached to a tapdisk. */
export type BenchTarget = Pick<Disk, "size" | "read" | "write">;

/** Runs the workload on an open disk. */
export async function runBench(
  disk: BenchTarget,
  o: BenchOptions,
): Promise<Omit<BenchResult, "spec" | "engine">> {
  const base = o.offset ?? 0;
  if (base >= disk.size) {
    throw new UsageError(`--offset ${base} is past the end of the disk (${disk.size} bytes)`);
  }
  const span = Math.floor(Math.min(o.size ?? Infinity, disk.size - base) / o.bs) * o.bs;
  if (span === 0) {
    throw new UsageError(`The disk (${disk.size} bytes) is smaller than one ${o.bs}-byte block`);
  }
  const blocks = span / o.bs;
  if (blocks > 2 ** 31) {
    throw new UsageError(`bench: --bs ${o.bs} is too small for a disk of ${disk.size} bytes`);
  }
  const write = o.rw === "write" || o.rw === "randwrite";
  const random = o.rw === "randread" || o.rw === "randwrite";
  const hist = new Histogram();
  let seed = 0, cursor = 0, ops = 0;
  const mask = 2 ** Math.ceil(Math.log2(blocks)) - 1;
  const start = performance.now(), deadline = start + o.seconds * 1000;

  async function worker(): Promise<void> {
    const buf = sharedPool.take(o.bs);
    try {
      if (write) { for (let i = 0; i < buf.length; i++) buf[i] = (i * 31 + ops) & 0xff; }
      for (let now = performance.now(); now < deadline;) {
        let off: number;
        if (random) {
          // A full-period LCG over the next power of two: every block once per pass, in a
          // scattered order (fio's default "random map" does the same).
          do seed = (Math.imul(seed, 1664525) + 1013904223) & mask; while (seed >= blocks);
          off = seed * o.bs;
        } else {
          off = cursor;
          cursor = cursor + o.bs >= span ? 0 : cursor + o.bs;
        }
        await (write ? disk.write(base + off, buf) : disk.read(base + off, buf));
        const done = performance.now();
        hist.add((done - now) * 1e6);
        ops++;
        now = done;
      }
    } finally {
      sharedPool.give(buf);
    }
  }

  await Promise.all(Array.from({ length: o.qd }, worker));
  const seconds = (performance.now() - start) / 1000;
  return {
    rw: o.rw,
    bs: o.bs,
    qd: o.qd,
    seconds,
    ops,
    iops: ops / seconds,
    mbps: (ops * o.bs) / seconds / 1e6,
    p50Us: hist.quantile(0.5),
    p99Us: hist.quantile(0.99),
  };
}

function formatLatency(us: number): string {
  return us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${us.toFixed(0)} µs`;
}

export const benchCommand: Command = {
  name: "bench",
  summary: "measure a disk's IOPS, throughput and latency in-process",
  usage: `Usage: tapd bench [SPEC] [options]

Drives the disk SPEC (tap:TYPE:PATH) from inside tapd at a fixed queue depth and prints IOPS,
MB/s and latency percentiles. Without SPEC it uses the default image (1 GiB, created once in
the state directory: $TAPD_STATE_DIR, /var/lib/tapd for root, else ~/.local/state/tapd).

Options:
  --rw read|write|randread|randwrite   access pattern (default randread)
  --bs SIZE                            request size (default 4k)
  --qd N                               requests in flight (default 64)
  --seconds N                          run time (default 5)
  --engine aio|uring|sync              I/O engine for file-backed disks
  --direct on|off|auto                 O_DIRECT (default: on for aio, off for sync)
  --batch N                            most requests per io_submit/io_uring_enter (default 1)
  --poll-us N                          poll for completions (with --ring: responses) N µs
                                       before sleeping (default 0)
  --cpus LIST                          pin the process to these CPUs, e.g. 0 or 0,2-3 (as taskset)
  --offset SIZE, --size SIZE           use only this window of the disk (default: all of it)
  --ring unix:PATH                     drive a running \`tapd tapdisk\` through its blkif ring
                                       instead of opening SPEC in this process
  --json                               print one JSON object instead of text

Writes overwrite the disk's contents.`,

  async run(args: string[]): Promise<number> {
    const { values, positionals } = parseCommandLine("bench", args, {
      rw: { type: "string", default: "randread" },
      bs: { type: "string", default: "4k" },
      qd: { type: "string", default: "64" },
      seconds: { type: "string", default: "5" },
      engine: { type: "string" },
      direct: { type: "string" },
      json: { type: "boolean", default: false },
      batch: { type: "string" },
      "poll-us": { type: "string" },
      cpus: { type: "string" },
      offset: { type: "string" },
      size: { type: "string" },
      ring: { type: "string" },
    });
    if (positionals.length > 1) {
      throw new UsageError(`bench: expected one disk spec, got ${positionals.length}`);
    }
    const options: BenchOptions = {
      rw: parseChoice(values.rw, "--rw", PATTERNS),
      bs: parseSize(values.bs, "--bs"),
      qd: parseCount(values.qd, "--qd", 4096),
      seconds: parseCount(values.seconds, "--seconds", 86400),
      offset: values.offset === undefined ? undefined : parseSize(values.offset, "--offset", true),
      size: values.size === undefined ? undefined : parseSize(values.size, "--size"),
    };
    if ((options.offset ?? 0) % 512 !== 0) {
      throw new UsageError(`Invalid --offset: must be a multiple of 512`);
    }
    if (options.bs % 512 !== 0) {
      throw new UsageError(`Invalid --bs "${values.bs}": must be a multiple of 512`);
    }
    const engine = values.engine === undefined
      ? undefined
      : parseChoice(values.engine, "--engine", ENGINE_KINDS);
    const direct = values.direct === undefined
      ? undefined
      : parseChoice(values.direct, "--direct", ["on", "off", "auto"] as const);
    const batch = values.batch === undefined
      ? undefined
      : parseCount(values.batch, "--batch", 4096);
    const pollMicros = parsePollMicros(values["poll-us"]);
    if (values.cpus !== undefined) pinProcess(parseCpuList(values.cpus));
    const write = options.rw.endsWith("write");
    let spec: string, r: Omit<BenchResult, "spec" | "engine">;
    if (values.ring !== undefined) {
      // Through a running `tapd tapdisk`: this process is the ring's frontend.
      if (positionals.length > 0) {
        throw new UsageError("bench: give a disk spec or --ring, not both");
      }
      if (!values.ring.startsWith("unix:")) {
        throw new UsageError(`bench: invalid --ring "${values.ring}": expected unix:PATH`);
      }
      spec = values.ring;
      const frontend = new RingFrontend(values.ring.slice(5), { pollMicros });
      try {
        r = await runBench(frontend, options);
      } finally {
        frontend.close();
      }
    } else {
      spec = positionals[0] ?? `tap:aio:${await ensureDefaultImage()}`;
      await using disk = await openDisk(spec, {
        engine,
        direct,
        readOnly: !write,
        depth: Math.max(options.qd, 1),
        batch,
        pollMicros,
      });
      r = await runBench(disk, options);
    }
    const result: BenchResult = { spec, engine: engine ?? "default", ...r };
    if (values.json) {
      console.log(JSON.stringify(result));
    } else {
      console.log(
        `${spec}: ${r.rw} bs=${r.bs} qd=${r.qd} engine=${result.engine}, ${
          r.seconds.toFixed(1)
        } s\n` +
          `  ${Math.round(r.iops)} IOPS  ${r.mbps.toFixed(1)} MB/s  ` +
          `latency p50 ${formatLatency(r.p50Us)}  p99 ${
            formatLatency(r.p99Us)
          }  (${r.ops} requests)`,
      );
    }
    return 0;
  },
};
