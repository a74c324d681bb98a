/** Command-line parsing shared by the subcommands: node:util parseArgs with tapd's errors. */
import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "./command.ts";
import { MAX_IO_THREADS } from "../fuse/io_threads.ts";

type Options = NonNullable<ParseArgsConfig["options"]>;

/** parseArgs in strict mode; any parse failure becomes a one-line UsageError naming the command. */
export function parseCommandLine<T extends Options>(
  command: string,
  args: string[],
  options: T,
): {
  values: ReturnType<
    typeof parseArgs<{ options: T; args: string[]; allowPositionals: true }>
  >["values"];
  positionals: string[];
} {
  try {
    const { values, positionals } = parseArgs({
      args,
      options,
      allowPositionals: true,
      strict: true,
    });
    return { values, positionals };
  } catch (e) {
    const text = (e as Error).message.split("\n")[0].split(". To specify")[0];
    throw new UsageError(`${command}: ${text}`);
  }
}

const UNITS: Readonly<Record<string, number>> = {
  "": 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
};

/** "4k", "1M", "10G", "512", "0x3000" (bytes; binary units, optional "B"/"iB") → bytes. */
export function parseSize(text: string, what: string, allowZero = false): number {
  const hex = /^0x[0-9a-f]+$/i.test(text.trim()) ? Number(text.trim()) : null;
  const m = /^(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?$/i.exec(text.trim());
  const bytes = hex ?? (m === null ? NaN : Number(m[1]) * UNITS[m[2].toLowerCase()]);
  if (!Number.isSafeInteger(bytes) || bytes < 0 || (bytes === 0 && !allowZero)) {
    throw new UsageError(`Invalid ${what} "${text}": expected a size such as 4k, 1M or 10G`);
  }
  return bytes;
}

/** A whole-number option from `min` (default 1) to `max`. */
export function parseCount(
  text: string,
  what: string,
  max = Number.MAX_SAFE_INTEGER,
  min = 1,
): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || !Number.isSafeInteger(n) || n < min || n > max) {
    throw new UsageError(
      `Invalid ${what} "${text}": expected a whole number from ${min} to ${max}`,
    );
  }
  return n;
}

/** `--poll-us N` (0 … 1,000,000 µs); undefined when not given. */
export function parsePollMicros(text: string | undefined): number | undefined {
  return text === undefined ? undefined : parseCount(text, "--poll-us", 1_000_000, 0);
}

/**
 * `--io-threads N` of a FUSE export (0 … MAX_IO_THREADS); undefined when not given. `fuse` is
 * the --fuse value: the option needs one.
 */
export function parseIoThreads(
  text: string | undefined,
  fuse: string | undefined,
  command: string,
): number | undefined {
  if (text === undefined) return undefined;
  if (fuse === undefined) throw new UsageError(`${command}: --io-threads is an option of --fuse`);
  return parseCount(text, "--io-threads", MAX_IO_THREADS, 0);
}

/**
 * `--fuse-uring` of a FUSE export (FUSE over io_uring): false when not given. `fuse` is the
 * --fuse value: the option needs one.
 */
export function parseFuseUring(
  flag: boolean | undefined,
  fuse: string | undefined,
  command: string,
): boolean {
  if (!flag) return false;
  if (fuse === undefined) throw new UsageError(`${command}: --fuse-uring is an option of --fuse`);
  return true;
}

/**
 * Passthrough takes a raw disk's reads and writes out of tapd altogether, so I/O threads or
 * FUSE over io_uring next to it would serve nothing: refused rather than ignored.
 */
export function checkPassthroughAlone(
  passthrough: boolean | undefined,
  ioThreads: number | null | undefined,
  uring: boolean,
  command: string,
): void {
  if (!passthrough) return;
  const other = uring ? "--fuse-uring" : ioThreads ? "--io-threads" : null;
  if (other !== null) {
    throw new UsageError(
      `${command}: --passthrough and ${other} both choose who serves reads and writes: give one`,
    );
  }
}

/** One of a fixed set of words. */
export function parseChoice<T extends string>(
  text: string,
  what: string,
  choices: readonly T[],
): T {
  if (!(choices as readonly string[]).includes(text)) {
    throw new UsageError(`Invalid ${what} "${text}": expected one of ${choices.join(", ")}`);
  }
  return text as T;
}

/** Formats a byte count the way the tools print it (binary units). */
export function formatSize(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = bytes, i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${Number.isInteger(v) ? v : v.toFixed(1)} ${units[i]}`;
}

/** A CPU list as taskset takes it: "0", "0,2", "1-3,5". */
export function parseCpuList(text: string): number[] {
  const cpus: number[] = [];
  for (const part of text.split(",")) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part.trim());
    const lo = m ? Number(m[1]) : NaN, hi = m?.[2] !== undefined ? Number(m[2]) : lo;
    if (!m || hi < lo || hi >= 1024) {
      throw new UsageError(`Invalid CPU list "${text}": expected e.g. 0 or 0,2-3`);
    }
    for (let c = lo; c <= hi; c++) cpus.push(c);
  }
  return cpus;
}
