/** Helpers for the image-tool tests: running tapd and qemu-img, making raw images, loop devices. */
import assert from "node:assert/strict";
import { type Rng, tempDir } from "../util.ts";
import { losetup } from "../util.ts";

const root = new URL("../../", import.meta.url).pathname;
export const KiB = 1024, MiB = 1024 * KiB;

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function exec(cmd: string, args: string[], cwd?: string): Promise<Run> {
  const { code, stdout, stderr } = await new Deno.Command(cmd, {
    args,
    cwd,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code, stdout: dec.decode(stdout), stderr: dec.decode(stderr) };
}

/** Runs the tapd program (the ./tapd launcher, as a user would). */
export function tapd(...args: string[]): Promise<Run> {
  return exec(`${root}tapd`, args);
}

/** Runs tapd in the directory `cwd`. */
export function tapdIn(cwd: string, ...args: string[]): Promise<Run> {
  return exec(`${root}tapd`, args, cwd);
}

/** Runs tapd and fails the test unless it exits 0 (the message names its stderr). */
export async function tapdOk(...args: string[]): Promise<Run> {
  const r = await tapd(...args);
  assert.equal(r.code, 0, `tapd ${args.join(" ")} failed: ${r.stderr}`);
  return r;
}

export function qemuImg(...args: string[]): Promise<Run> {
  return exec("qemu-img", args);
}

export async function qemuImgOk(...args: string[]): Promise<Run> {
  const r = await qemuImg(...args);
  assert.equal(r.code, 0, `qemu-img ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
  return r;
}

export async function qemuIoOk(...args: string[]): Promise<Run> {
  const r = await exec("qemu-io", args);
  assert.equal(r.code, 0, `qemu-io ${args.join(" ")} failed: ${r.stderr}${r.stdout}`);
  assert.doesNotMatch(r.stdout, /error|failed/i, `qemu-io ${args.join(" ")}: ${r.stdout}`);
  return r;
}

/** `qemu-img info --output=json` of an image, format given. */
export async function qemuInfo(path: string, format: string): Promise<Record<string, unknown>> {
  return JSON.parse((await qemuImgOk("info", "--output=json", "-f", format, path)).stdout);
}

/** Fails unless `qemu-img compare` says the two images have identical contents. */
export async function assertSameContents(
  a: string,
  aFormat: string,
  b: string,
  bFormat: string,
): Promise<void> {
  const r = await qemuImg("compare", "-f", aFormat, "-F", bFormat, a, b);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /Images are identical/);
}

/** Fails unless the command failed with exit `code` and exactly one stderr line matching. */
export function assertOneLineError(r: Run, code: number, pattern: RegExp): void {
  assert.equal(r.code, code, `expected exit ${code}, got ${r.code}: ${r.stderr}`);
  const lines = r.stderr.trim().split("\n");
  assert.equal(lines.length, 1, `expected one line, got:\n${r.stderr}`);
  assert.match(lines[0], /^tapd: /);
  assert.match(lines[0], pattern);
}

/** The names in a directory, sorted (to check that nothing, not even a partial file, was left). */
export function listDir(dir: string): string[] {
  return [...Deno.readDirSync(dir)].map((e) => e.name).sort();
}

/** Bytes allocated on disk for a file (st_blocks × 512). */
export function allocated(path: string): number {
  return (Deno.statSync(path).blocks ?? 0) * 512;
}

/** How a piece of a test image is filled. */
export type Fill = "random" | "zeros" | "hole";

/**
 * Writes a raw image of `size` bytes made of pieces of `piece` bytes filled in turn as `pattern`
 * says ("zeros" are written, "hole"s are skipped), and returns its contents.
 */
export function makeRaw(
  path: string,
  size: number,
  r: Rng,
  pattern: readonly Fill[] = ["random", "zeros", "random", "hole"],
  piece = 96 * KiB + 512,
): Uint8Array {
  const contents = new Uint8Array(size);
  using f = Deno.openSync(path, { write: true, create: true, truncate: true });
  for (let off = 0, i = 0; off < size; off += piece, i++) {
    const n = Math.min(piece, size - off);
    const fill = pattern[i % pattern.length];
    if (fill === "random") r.fill(contents.subarray(off, off + n));
    if (fill === "hole") continue;
    f.seekSync(off, Deno.SeekMode.Start);
    const bytes = contents.subarray(off, off + n);
    for (let done = 0; done < n;) done += f.writeSync(bytes.subarray(done));
  }
  f.truncateSync(size);
  return contents;
}

/** Bytes of `contents` in 4 KiB blocks that hold a non-zero byte (what a sparse copy stores). */
export function dataBytes(contents: Uint8Array): number {
  let n = 0;
  for (let off = 0; off < contents.length; off += 4096) {
    const block = contents.subarray(off, off + 4096);
    if (block.some((b) => b !== 0)) n += 4096;
  }
  return n;
}

/** Runs `fn` in a fresh directory under /var/tmp, removed afterwards. */
export async function inTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = tempDir("tapd-tools-");
  try {
    return await fn(dir);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
}

/** Runs `fn` with a loop device over `file`, detached afterwards. */
export async function withLoopDevice<T>(file: string, fn: (dev: string) => Promise<T>): Promise<T> {
  const r = losetup("--find", "--show", file);
  if (!r.ok) throw new Error(`losetup: ${r.out}`);
  try {
    return await fn(r.out);
  } finally {
    losetup("-d", r.out);
  }
}

/**
 * A qcow image written by QEMU with compressed clusters (qemu-img 7.2's `convert -c -O qcow`
 * fails on qcow v1, so qemu-io writes them one cluster at a time): per 4 KiB cluster in turn a
 * compressed pattern, a compressed write of random data (QEMU stores it uncompressed), a hole, a
 * plain write, a compressed cluster of zeros. Returns the contents it reads as.
 */
export async function makeCompressedQcow(
  dir: string,
  name: string,
  size: number,
  r: Rng,
): Promise<{ path: string; contents: Uint8Array }> {
  const path = `${dir}/${name}`, random = `${dir}/${name}.random`;
  const block = r.fill(new Uint8Array(4096));
  Deno.writeFileSync(random, block);
  await qemuImgOk("create", "-q", "-f", "qcow", path, String(size));
  const contents = new Uint8Array(Math.ceil(size / 512) * 512);
  const commands: string[] = [];
  for (let off = 0, i = 0; off < contents.length; off += 4096, i++) {
    const n = Math.min(4096, contents.length - off), pattern = (i % 250) + 1;
    switch (i % 5) {
      case 0:
        commands.push("-c", `write -q -c -P ${pattern} ${off} ${n}`);
        contents.fill(pattern, off, off + n);
        break;
      case 1:
        commands.push("-c", `write -q -c -s ${random} ${off} ${n}`);
        contents.set(block.subarray(0, n), off);
        break;
      case 3:
        commands.push("-c", `write -q -P ${pattern} ${off} ${n}`);
        contents.fill(pattern, off, off + n);
        break;
      case 4:
        commands.push("-c", `write -q -c -P 0 ${off} ${n}`);
        break;
    }
  }
  await qemuIoOk("-f", "qcow", ...commands, path);
  Deno.removeSync(random);
  return { path, contents };
}

export { loopUnavailable } from "../util.ts";
