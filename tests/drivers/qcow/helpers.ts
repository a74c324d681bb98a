/**
 * Helpers shared by the qcow driver tests: running qemu-img / qemu-io, reading a whole disk,
 * comparing allocation maps, random image contents and random requests.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import type { Disk } from "../../../drivers/disk.ts";
import type { Extent } from "../../../drivers/driver.ts";
import { sharedPool } from "../../../io/buffer_pool.ts";
import { assertBytes as slowAssertBytes, type Rng, rng } from "../../util.ts";
import { readRange } from "../../util.ts";

export { readRange };

export const KiB = 1024, MiB = 1024 * KiB;
export const SECTOR = 512;

// ---- external programs ----

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a program to completion and returns its exit code and output. */
export async function run(cmd: string, args: string[], cwd?: string): Promise<RunResult> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" })
    .output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** Runs qemu-img and returns its standard output; throws with its messages when it fails. */
export async function qemuImg(args: string[], cwd?: string): Promise<string> {
  const r = await run("qemu-img", args, cwd);
  if (r.code !== 0) {
    throw new Error(`qemu-img ${args.join(" ")} exited with ${r.code}: ${r.stderr}${r.stdout}`);
  }
  return r.stdout;
}

/**
 * Runs qemu-io commands (`write -P 0xab 0 64k`, …) on an image, with O_DIRECT like tapd: dirty
 * page-cache pages of an image that tapd then writes with O_DIRECT can make the kernel fail a
 * later fdatasync with EIO ("Page cache invalidation failure on direct I/O").
 */
export async function qemuIo(img: string, commands: string[], cwd?: string, fmt = "qcow") {
  const args = ["-f", fmt, "-t", "none"];
  for (const c of commands) args.push("-c", c);
  args.push(img);
  const r = await run("qemu-io", args, cwd);
  // qemu-io exits 0 even when a command fails, but says so on stderr / stdout.
  if (r.code !== 0 || /error|failed|Invalid/i.test(r.stderr + r.stdout)) {
    throw new Error(`qemu-io ${args.join(" ")} failed (${r.code}): ${r.stderr}${r.stdout}`);
  }
}

/** `qemu-img info --output=json -f FMT IMG`. */
export async function qemuInfo(
  img: string,
  cwd?: string,
  fmt = "qcow",
): Promise<Record<string, unknown>> {
  return JSON.parse(await qemuImg(["info", "--output=json", "-f", fmt, img], cwd));
}

/** Asserts `qemu-img compare -f qcow -F raw IMG REF` says the images are identical. */
export async function assertQemuSame(img: string, ref: string, cwd?: string): Promise<void> {
  const r = await run("qemu-img", ["compare", "-f", "qcow", "-F", "raw", img, ref], cwd);
  assert.equal(
    r.code,
    0,
    `qemu-img compare ${img} ${ref} exited with ${r.code}: ${r.stdout.trim()} ${r.stderr.trim()}`,
  );
}

// ---- allocation maps ----

/** A run of the disk that is, or is not, allocated in the image itself (not a backing file). */
export interface Run {
  start: number;
  length: number;
  allocated: boolean;
}

function pushRun(runs: Run[], start: number, length: number, allocated: boolean): void {
  const last = runs.at(-1);
  if (last !== undefined && last.allocated === allocated && last.start + last.length === start) {
    last.length += length;
  } else runs.push({ start, length, allocated });
}

/** The whole-disk allocation map from tapd's blockStatus, merged into runs. */
export async function tapdMap(disk: Disk): Promise<Run[]> {
  const runs: Run[] = [];
  for (let pos = 0; pos < disk.size;) {
    const extents: Extent[] = await disk.blockStatus(pos, disk.size - pos);
    assert.ok(extents.length > 0, `blockStatus at ${pos} returned no extents`);
    for (const e of extents) {
      assert.equal(e.offset, pos, `blockStatus extents not contiguous at ${pos}`);
      assert.ok(e.length > 0 && e.length % SECTOR === 0, `bad extent ${JSON.stringify(e)}`);
      if (e.allocated) assert.equal(e.zero, false, `allocated extent marked zero at ${pos}`);
      pushRun(runs, e.offset, e.length, e.allocated);
      pos += e.length;
    }
  }
  return runs;
}

/** The allocation map `qemu-img map` reports: data in the top image (depth 0) or not. */
export async function qemuMap(img: string, cwd?: string): Promise<Run[]> {
  const entries = JSON.parse(
    await qemuImg(["map", "--output=json", "-f", "qcow", img], cwd),
  ) as { start: number; length: number; depth: number; data: boolean; present: boolean }[];
  const runs: Run[] = [];
  for (const e of entries) pushRun(runs, e.start, e.length, e.depth === 0 && e.data);
  return runs;
}

/** Asserts tapd and qemu-img agree on which ranges of the image are allocated. */
export async function assertMapsAgree(disk: Disk, img: string, cwd?: string): Promise<void> {
  const ours = await tapdMap(disk);
  const theirs = await qemuMap(img, cwd);
  assert.deepEqual(ours, theirs, `allocation maps of ${img} differ (tapd vs qemu-img map)`);
}

// ---- reading and comparing ----

/** assertBytes with a native fast path for the (usual) equal case. */
export function assertSame(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (!a.equals(b)) slowAssertBytes(actual, expected, what);
}

export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.length).equals(
    Buffer.from(b.buffer, b.byteOffset, b.length),
  );
}

/** The whole disk, read in chunks of `chunk` bytes. */
export async function readAll(disk: Disk, chunk = MiB): Promise<Uint8Array> {
  const out = new Uint8Array(disk.size);
  const buf = sharedPool.take(chunk);
  try {
    for (let off = 0; off < disk.size; off += chunk) {
      const n = Math.min(chunk, disk.size - off);
      buf.fill(0xa5);
      await disk.read(off, buf.subarray(0, n));
      out.set(buf.subarray(0, n), off);
    }
  } finally {
    sharedPool.give(buf);
  }
  return out;
}

/** Reads the whole disk in chunks of `chunk` bytes and compares it with `ref`. */
export async function verifyDisk(disk: Disk, ref: Uint8Array, what: string, chunk = MiB) {
  assert.equal(disk.size, ref.length, `${what}: size`);
  const buf = sharedPool.take(chunk);
  try {
    for (let off = 0; off < disk.size; off += chunk) {
      const n = Math.min(chunk, disk.size - off);
      const view = buf.subarray(0, n);
      view.fill(0xa5);
      await disk.read(off, view);
      assertSame(view, ref.subarray(off, off + n), `${what}: disk at ${off}`);
    }
  } finally {
    sharedPool.give(buf);
  }
}

/**
 * `count` reads at random sector offsets that are not cluster-aligned (when clusters are larger
 * than a sector), of random lengths crossing cluster boundaries, some of them concurrent.
 */
export async function verifyRandomReads(
  disk: Disk,
  ref: Uint8Array,
  r: Rng,
  count: number,
  clusterSize: number,
  what: string,
): Promise<void> {
  const sectors = disk.size / SECTOR;
  for (let i = 0; i < count; i += 8) {
    const batch: Promise<void>[] = [];
    for (let k = 0; k < 8; k++) {
      let sector = r.below(sectors);
      if (clusterSize > SECTOR && (sector * SECTOR) % clusterSize === 0) sector++;
      if (sector >= sectors) sector = 1;
      const offset = sector * SECTOR;
      const max = Math.min(sectors - sector, (2 * clusterSize + 64 * KiB) / SECTOR);
      const length = (1 + r.below(max)) * SECTOR;
      batch.push(
        readRange(disk, offset, length).then((got) =>
          assertSame(got, ref.subarray(offset, offset + length), `${what}: ${length} at ${offset}`)
        ),
      );
    }
    await Promise.all(batch);
  }
}

// ---- contents ----

/**
 * Random contents for a raw file: runs of random bytes, zeros (holes) and compressible data
 * (bytes from a four-letter alphabet, or a short repeated pattern).
 */
export function randomContent(r: Rng, size: number, grain = 4 * KiB): Uint8Array {
  const out = new Uint8Array(size);
  for (let pos = 0; pos < size;) {
    const len = Math.min(size - pos, grain * (1 + r.below(64)));
    const part = out.subarray(pos, pos + len);
    const kind = r.below(10);
    if (kind < 4) r.fill(part);
    else if (kind < 7) {
      // zeros
    } else if (kind < 9) {
      r.fill(part);
      for (let i = 0; i < part.length; i++) part[i] &= 3;
    } else {
      const pattern = r.fill(new Uint8Array(1 + r.below(32)));
      for (let i = 0; i < part.length; i++) part[i] = pattern[i % pattern.length];
    }
    pos += len;
  }
  return out;
}

/** Writes `bytes` to `path` and returns them. */
export function writeFile(path: string, bytes: Uint8Array): Uint8Array {
  Deno.writeFileSync(path, bytes);
  return bytes;
}

/** Promise.race against a timer that rejects after `ms` milliseconds. */
export async function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timeout: ${what} took over ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

// ---- the crash test's writes (computed the same way by the child and the parent) ----

/**
 * The writes one crash-test round makes, from its seed: random sector ranges of a disk of `size`
 * bytes, none overlapping another (each region is written at most once per round), so after a
 * crash each sector holds either its old contents or the data of the one write that covers it.
 */
export function crashPlan(seed: number, size: number, count: number): Range[] {
  const r = rng(seed);
  const sectors = size / SECTOR;
  const taken = new Uint8Array(sectors);
  const plan: Range[] = [];
  for (let tries = 0; plan.length < count && tries < count * 4; tries++) {
    const n = 1 + r.below(r.below(8) === 0 ? 32 : 2);
    const s = r.below(sectors - n + 1);
    if (taken.subarray(s, s + n).some((t) => t !== 0)) continue;
    taken.fill(1, s, s + n);
    plan.push({ offset: s * SECTOR, length: n * SECTOR });
  }
  return plan;
}

/** The data of write `index` of the round with `seed`. */
export function crashData(seed: number, index: number, length: number): Uint8Array {
  return rng((seed * 7919 + index * 104729 + 1) >>> 0).fill(new Uint8Array(length));
}

export interface Range {
  offset: number;
  length: number;
}
