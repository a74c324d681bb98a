/**
 * Helpers shared by the vmdk driver tests: the qcow tests' helpers (qemu-img, qemu-io, reading
 * and comparing disks, random contents, the crash plan) with the format set to vmdk, and random
 * writes through tapd that a reference buffer receives too.
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import type { Rng } from "../../util.ts";
import { randomWriteBatches } from "../image_helpers.ts";
import { qemuImg, qemuIo, run, SECTOR } from "../qcow/helpers.ts";

export {
  assertSame,
  crashData,
  crashPlan,
  KiB,
  MiB,
  qemuImg,
  randomContent,
  readAll,
  readRange,
  run,
  sameBytes,
  SECTOR,
  verifyDisk,
  verifyRandomReads,
  withTimeout,
  writeFile,
} from "../qcow/helpers.ts";

/** qemu-io commands on a vmdk image (O_DIRECT, failing on any error message). */
export function qemuIoVmdk(img: string, commands: string[], cwd?: string): Promise<void> {
  return qemuIo(img, commands, cwd, "vmdk");
}

/** `qemu-img info --output=json -f vmdk IMG`. */
export async function vmdkInfo(img: string, cwd?: string): Promise<Record<string, unknown>> {
  return JSON.parse(await qemuImg(["info", "--output=json", "-f", "vmdk", img], cwd));
}

/** Asserts `qemu-img compare -f vmdk -F raw IMG REF` finds them identical. */
export async function assertQemuSameVmdk(img: string, ref: string, cwd?: string): Promise<void> {
  const r = await run("qemu-img", ["compare", "-f", "vmdk", "-F", "raw", img, ref], cwd);
  assert.equal(r.code, 0, `qemu-img compare ${img} ${ref}: ${r.stdout.trim()} ${r.stderr.trim()}`);
}

/** Asserts `qemu-img check -f vmdk IMG` finds no errors. */
export async function assertQemuCheck(img: string, cwd?: string): Promise<void> {
  const r = await run("qemu-img", ["check", "-f", "vmdk", img], cwd);
  assert.equal(r.code, 0, `qemu-img check ${img}: ${r.stdout.trim()} ${r.stderr.trim()}`);
}

/** What `qemu-img convert -O raw` makes of a vmdk image. */
export async function qemuRaw(img: string, dir: string): Promise<Uint8Array> {
  const out = `${dir}/qemu-out.raw`;
  await qemuImg(["convert", "-f", "vmdk", "-O", "raw", img, out]);
  const bytes = Deno.readFileSync(out);
  Deno.removeSync(out);
  return bytes;
}

export interface Range {
  offset: number;
  length: number;
}

/** A random range: inside one grain, whole grains, across grains/tables, or small. */
export function randomRange(r: Rng, size: number, grain: number, gtSpan: number): Range {
  let offset: number, length: number;
  switch (r.below(5)) {
    case 0: {
      const inOff = r.below(grain / SECTOR) * SECTOR;
      offset = r.below(Math.ceil(size / grain)) * grain + inOff;
      length = (1 + r.below((grain - inOff) / SECTOR)) * SECTOR;
      break;
    }
    case 1:
      offset = r.below(Math.ceil(size / grain)) * grain;
      length = (1 + r.below(3)) * grain;
      break;
    case 2: { // across a grain-table boundary
      const b = (1 + r.below(Math.max(1, Math.floor(size / gtSpan) - 1))) * gtSpan;
      offset = Math.max(0, b - (1 + r.below(2 * grain / SECTOR)) * SECTOR);
      length = (1 + r.below(4 * grain / SECTOR)) * SECTOR;
      break;
    }
    case 3:
      offset = r.below(size / SECTOR) * SECTOR;
      length = (1 + r.below(Math.min(512, 3 * grain / SECTOR))) * SECTOR;
      break;
    default:
      offset = r.below(size / SECTOR) * SECTOR;
      length = (1 + r.below(8)) * SECTOR;
  }
  offset = Math.min(offset, size - SECTOR);
  length = Math.min(length, size - offset);
  return { offset, length };
}

/**
 * `count` random writes through tapd in concurrent batches of non-overlapping ranges (some
 * scatter-gather, some from pool memory); `ref` receives the same writes.
 */
export function randomWrites(
  disk: Disk,
  ref: Uint8Array,
  r: Rng,
  count: number,
  grain: number,
  gtSpan: number,
): Promise<void> {
  return randomWriteBatches(
    disk,
    ref,
    r,
    count,
    () => randomRange(r, disk.size, grain, gtSpan),
  );
}

/** A run of the disk with one state in the top image: data, reads as zero, or neither. */
export interface MapRun {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

function pushRun(runs: MapRun[], start: number, length: number, data: boolean, zero: boolean) {
  const last = runs.at(-1);
  if (last !== undefined && last.data === data && last.zero === zero) last.length += length;
  else runs.push({ start, length, data, zero });
}

/** tapd's allocation map of a disk without a parent, merged into runs. */
export async function tapdMap(disk: Disk): Promise<MapRun[]> {
  const runs: MapRun[] = [];
  for (let pos = 0; pos < disk.size;) {
    for (const e of await disk.blockStatus(pos, disk.size - pos)) {
      assert.equal(e.offset, pos);
      pushRun(runs, e.offset, e.length, e.allocated, e.zero);
      pos += e.length;
    }
  }
  return runs;
}

/** `qemu-img map` of a vmdk image, in the same terms (data in the top image, zero). */
export async function qemuMapVmdk(img: string): Promise<MapRun[]> {
  const entries = JSON.parse(
    await qemuImg(["map", "--output=json", "-f", "vmdk", img]),
  ) as { start: number; length: number; depth: number; data: boolean; zero: boolean }[];
  const runs: MapRun[] = [];
  for (const e of entries) {
    const data = e.depth === 0 && e.data;
    pushRun(runs, e.start, e.length, data, !data && e.zero);
  }
  return runs;
}
