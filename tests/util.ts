import { sharedPool } from "../io/buffer_pool.ts";
import type { Disk } from "../drivers/disk.ts";
/** Small helpers shared by the unit tests. */

/** A seeded xorshift32 generator: the same seed gives the same sequence on every run. */
export class Rng {
  #s: number;

  constructor(seed: number) {
    this.#s = (seed >>> 0) || 0x9e3779b9;
  }

  /** The next value in [0, 2^32). */
  u32(): number {
    let x = this.#s;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.#s = x >>> 0;
    return this.#s;
  }

  /** An integer in [0, n). */
  below(n: number): number {
    return Math.floor((this.u32() / 0x100000000) * n);
  }

  /** Fills `bytes` with pseudo-random data. */
  fill<T extends Uint8Array>(bytes: T): T {
    const words = Math.floor(bytes.length / 4);
    if (bytes.byteOffset % 4 === 0) {
      const w = new Uint32Array(bytes.buffer, bytes.byteOffset, words);
      for (let i = 0; i < words; i++) w[i] = this.u32();
    } else {
      for (let i = 0; i < words * 4; i++) bytes[i] = this.u32() & 0xff;
    }
    for (let i = words * 4; i < bytes.length; i++) bytes[i] = this.u32() & 0xff;
    return bytes;
  }
}

/** A seeded generator (see `Rng`). */
export function rng(seed: number): Rng {
  return new Rng(seed);
}

/**
 * A fresh directory under /var/tmp (ext4 here: O_DIRECT and SEEK_DATA work, unlike tmpfs).
 * The caller removes it, best with `withTempDir`.
 */
export function tempDir(prefix = "tapd-test-"): string {
  return Deno.makeTempDirSync({ dir: "/var/tmp", prefix });
}

/** Runs `fn` with a fresh temporary directory and removes the directory afterwards. */
export async function withTempDir<T>(fn: (dir: string) => T | Promise<T>): Promise<T> {
  const dir = tempDir();
  try {
    return await fn(dir);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

/** The index of the first byte where `a` and `b` differ, or -1 when they are equal. */
export function firstDifference(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/** Throws, naming the first differing byte, unless `actual` equals `expected`. */
export function assertBytes(actual: Uint8Array, expected: Uint8Array, what = "bytes"): void {
  const at = firstDifference(actual, expected);
  if (at >= 0) {
    throw new Error(
      `${what} differ at byte ${at} (lengths ${actual.length}/${expected.length}): ` +
        `got ${actual[at]}, expected ${expected[at]}`,
    );
  }
}

/** Runs losetup; `out` holds its stdout and stderr. */
export function losetup(...args: string[]): { ok: boolean; out: string } {
  try {
    const r = new Deno.Command("losetup", { args, stdout: "piped", stderr: "piped" }).outputSync();
    const dec = new TextDecoder();
    return { ok: r.success, out: dec.decode(r.stdout).trim() + dec.decode(r.stderr).trim() };
  } catch (e) {
    return { ok: false, out: String(e) };
  }
}

/** Why loop devices cannot be used here (tried for real), or null when they can. */
export function loopUnavailable(): string | null {
  if (Deno.uid() !== 0) return "needs root";
  const dir = tempDir("tapd-loop-probe-");
  try {
    const file = `${dir}/probe.img`;
    Deno.writeFileSync(file, new Uint8Array(0));
    Deno.truncateSync(file, 1024 * 1024);
    const r = losetup("--find", "--show", file);
    if (!r.ok || !r.out.startsWith("/dev/loop")) return `losetup failed: ${r.out.split("\n")[0]}`;
    losetup("-d", r.out);
    return null;
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

/** Reads `length` bytes at `offset` into fresh memory (through a pool buffer). */
export async function readRange(disk: Disk, offset: number, length: number): Promise<Uint8Array> {
  const buf = sharedPool.take(length);
  try {
    buf.fill(0xa5);
    await disk.read(offset, buf);
    return buf.slice();
  } finally {
    sharedPool.give(buf);
  }
}

/** True if `path` exists (any kind of file). */
export async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch {
    return false;
  }
}

/** CPU time (user + system, in clock ticks) process `pid` has used so far. */
export function cpuTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(f[11]) + Number(f[12]); // utime, stime (fields 14 and 15)
}

/**
 * Runs `fn`, then fails if any promise rejection went unhandled meanwhile (Deno would otherwise
 * end the test process on the first one); `settleMs` lets late ones surface before the check.
 */
export async function withNoUnhandledRejections(
  fn: () => Promise<void>,
  settleMs = 0,
): Promise<void> {
  const unhandled: string[] = [];
  const onUnhandled = (e: PromiseRejectionEvent) => {
    e.preventDefault();
    unhandled.push(String(e.reason?.message ?? e.reason));
  };
  globalThis.addEventListener("unhandledrejection", onUnhandled);
  try {
    await fn();
    if (settleMs > 0) await new Promise((resolve) => setTimeout(resolve, settleMs));
  } finally {
    globalThis.removeEventListener("unhandledrejection", onUnhandled);
  }
  if (unhandled.length > 0) {
    throw new Error(`unhandled promise rejections: ${JSON.stringify(unhandled)}`);
  }
}

/** The image lock bytes (drivers/image_lock.ts) any process holds on `path` now, from /proc/locks. */
export function lockedBytes(path: string): number[] {
  const { dev, ino } = Deno.statSync(path);
  const major = (dev! >> 8) & 0xfff, minor = (dev! & 0xff) | ((dev! >> 12) & 0xfff00);
  const id = `${major.toString(16).padStart(2, "0")}:${minor.toString(16).padStart(2, "0")}:${ino}`;
  const bytes: number[] = [];
  for (const line of Deno.readTextFileSync("/proc/locks").split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f[1] !== "OFDLCK" || f[5] !== id) continue;
    for (let b = Number(f[6]); b <= Number(f[7]); b++) bytes.push(b);
  }
  return bytes.sort((a, b) => a - b);
}

/**
 * qemu-io holding the image `path` open (with `flags`) until disposed; its locks are set on
 * return (QEMU locks a qcow image's "consistent read" byte last, after "no writers"; a raw image
 * it writes gets "write" and shares writing).
 */
export async function qemuIoHolding(path: string, ...flags: string[]): Promise<AsyncDisposable> {
  const child = new Deno.Command("qemu-io", {
    args: [...flags, "-c", "sleep 60000", path],
    stdout: "null",
    stderr: "piped",
  }).spawn();
  const deadline = Date.now() + 10_000;
  for (;;) {
    const held = lockedBytes(path);
    if (held.includes(100) && (held.includes(201) || held.includes(101))) break;
    if (Date.now() > deadline) throw new Error(`qemu-io ${flags.join(" ")} ${path} took no lock`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    async [Symbol.asyncDispose]() {
      child.kill("SIGKILL");
      await child.output();
    },
  };
}
