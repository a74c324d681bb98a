/**
 * Helpers shared by the vhd driver tests: QEMU's view of a vpc image (compare, map), random
 * writes through tapd mirrored into a reference, and the qcow tests' general helpers.
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import { vhdFormat } from "../../../drivers/vhd/format.ts";
import type { Rng } from "../../util.ts";
import { randomWriteBatches } from "../image_helpers.ts";
import { KiB, qemuImg, type Run, run, SECTOR, tapdMap } from "../qcow/helpers.ts";

export * from "../qcow/helpers.ts";

/** Asserts `qemu-img compare -f vpc -F raw IMG REF` says the images are identical. */
export async function assertQemuSame(img: string, ref: string): Promise<void> {
  const r = await run("qemu-img", ["compare", "-f", "vpc", "-F", "raw", img, ref]);
  assert.equal(r.code, 0, `qemu-img compare ${img} ${ref}: ${r.code} ${r.stdout} ${r.stderr}`);
}

/** `qemu-img map` of a vpc image: data in the image (allocated) or not. */
export async function qemuVpcMap(img: string): Promise<Run[]> {
  const entries = JSON.parse(await qemuImg(["map", "--output=json", "-f", "vpc", img])) as {
    start: number;
    length: number;
    depth: number;
    data: boolean;
  }[];
  const runs: Run[] = [];
  for (const e of entries) {
    const allocated = e.depth === 0 && e.data, last = runs.at(-1);
    if (last !== undefined && last.allocated === allocated) last.length += e.length;
    else runs.push({ start: e.start, length: e.length, allocated });
  }
  return runs;
}

/** Asserts tapd's blockStatus and `qemu-img map` agree (dynamic disks, full bitmaps). */
export async function assertMapsAgree(disk: Disk, img: string): Promise<void> {
  assert.deepEqual(await tapdMap(disk), await qemuVpcMap(img), `maps of ${img} differ`);
}

/** Asserts `tapd check` finds no errors (leaks allowed when `leaksOk`). */
export async function assertCheckClean(img: string, leaksOk = false): Promise<void> {
  const report = await vhdFormat.check(img);
  assert.deepEqual(report.errors, [], `check ${img}: ${JSON.stringify(report)}`);
  if (!leaksOk) assert.deepEqual(report.leaks, [], `check ${img}: ${JSON.stringify(report)}`);
}

export interface Range {
  offset: number;
  length: number;
}

/** A random write range: inside a block, whole blocks, across blocks, or small. */
export function randomRange(r: Rng, size: number, blockSize: number): Range {
  const blocks = Math.ceil(size / blockSize);
  let offset: number, length: number;
  switch (r.below(4)) {
    case 0: {
      const inOff = r.below(blockSize / SECTOR) * SECTOR;
      offset = r.below(blocks) * blockSize + inOff;
      length = (1 + r.below(Math.min(512, (blockSize - inOff) / SECTOR))) * SECTOR;
      break;
    }
    case 1:
      offset = r.below(blocks) * blockSize;
      length = Math.min(blockSize, 512 * KiB) * (1 + r.below(2));
      break;
    case 2: // across a block boundary
      offset = Math.max(0, (1 + r.below(blocks - 1)) * blockSize - (1 + r.below(64)) * SECTOR);
      length = (1 + r.below(256)) * SECTOR;
      break;
    default:
      offset = r.below(size / SECTOR) * SECTOR;
      length = (1 + r.below(8)) * SECTOR;
  }
  offset = Math.min(offset, size - SECTOR);
  return { offset, length: Math.min(length, size - offset) };
}

/**
 * `count` random writes through tapd in concurrent batches of non-overlapping ranges (some as
 * scatter-gather lists, some from pool memory); `ref` receives the same writes.
 */
export function tapdWrites(
  disk: Disk,
  ref: Uint8Array,
  r: Rng,
  blockSize: number,
  count: number,
): Promise<void> {
  return randomWriteBatches(disk, ref, r, count, () => randomRange(r, disk.size, blockSize));
}
