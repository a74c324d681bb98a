/**
 * Random concurrent reads, writes (partial blocks, across block boundaries, scatter-gather),
 * zero writes and discards through the vhd driver, checked byte for byte against a reference
 * kept in memory, across a reopen, then by `tapd check` and against QEMU where QEMU can read
 * the image (dynamic disks; QEMU ignores a differencing disk's parent).
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import { openDisk } from "../../../drivers/mod.ts";
import { vhdFormat } from "../../../drivers/vhd/format.ts";
import { sharedPool } from "../../../io/buffer_pool.ts";
import { type Rng, rng, withTempDir } from "../../util.ts";
import {
  assertCheckClean,
  assertMapsAgree,
  assertQemuSame,
  assertSame,
  KiB,
  MiB,
  qemuImg,
  randomContent,
  readRange,
  SECTOR,
  verifyDisk,
  writeFile,
} from "./helpers.ts";

const SIZE = 12 * MiB + 7 * SECTOR;
const BATCH = 24;

interface Config {
  name: string;
  blockSize: number;
  parent: "none" | "dynamic" | "fixed";
  ops: number;
}

const CONFIGS: Config[] = [
  { name: "dynamic, 64 KiB blocks", blockSize: 64 * KiB, parent: "none", ops: 1500 },
  {
    name: "differencing, 4 KiB blocks, dynamic parent",
    blockSize: 4096,
    parent: "dynamic",
    ops: 1500,
  },
  {
    name: "differencing, 2 MiB blocks, fixed parent",
    blockSize: 2 * MiB,
    parent: "fixed",
    ops: 1200,
  },
];

interface Range {
  offset: number;
  length: number;
}

const overlaps = (a: Range, b: Range) =>
  a.offset < b.offset + b.length && b.offset < a.offset + a.length;

/** Up to BATCH random ranges, none overlapping another, some crossing block boundaries. */
function randomRanges(r: Rng, size: number, bs: number): Range[] {
  const ranges: Range[] = [];
  for (let tries = 0; ranges.length < BATCH && tries < BATCH * 4; tries++) {
    let offset: number, length: number;
    if (r.below(3) === 0) {
      const boundary = (1 + r.below(Math.floor(size / bs) - 1)) * bs;
      offset = boundary - (1 + r.below(16)) * SECTOR;
      length = (1 + r.below(64)) * SECTOR;
    } else {
      length = (1 + r.below(r.below(4) === 0 ? 512 : 16)) * SECTOR;
      offset = r.below((size - length) / SECTOR + 1) * SECTOR;
    }
    length = Math.min(length, size - offset);
    const x = { offset, length };
    if (!ranges.some((y) => overlaps(x, y))) ranges.push(x);
  }
  return ranges;
}

/** One buffer, or a scatter-gather list (sometimes of odd byte sizes), pooled or plain. */
function makeBuffers(
  r: Rng,
  length: number,
): { bufs: Uint8Array[]; pooled: Uint8Array<ArrayBuffer>[] } {
  const cuts: number[] = [];
  if (length >= 2 * SECTOR && r.below(3) === 0) {
    const odd = r.below(4) === 0;
    cuts.push(odd ? 1 + r.below(length - 1) : (1 + r.below(length / SECTOR - 1)) * SECTOR);
  }
  const bounds = [0, ...cuts, length], bufs: Uint8Array[] = [];
  const pooled: Uint8Array<ArrayBuffer>[] = [];
  for (let i = 0; i + 1 < bounds.length; i++) {
    const n = bounds[i + 1] - bounds[i];
    if (r.below(2) === 0) {
      const b = sharedPool.take(n);
      pooled.push(b);
      bufs.push(b);
    } else bufs.push(new Uint8Array(n));
  }
  return { bufs, pooled };
}

async function torture(disk: Disk, ref: Uint8Array, r: Rng, count: number, bs: number) {
  const n = { reads: 0, writes: 0, zeroes: 0 };
  for (let ops = 0; ops < count;) {
    const batch = randomRanges(r, disk.size, bs).map(async ({ offset, length }) => {
      const kind = r.below(20);
      if (kind < 3) {
        ref.fill(0, offset, offset + length);
        if (kind === 0) await disk.discard(offset, length);
        else await disk.writeZeroes(offset, length, { mayUnmap: kind === 1 });
        n.zeroes++;
        return;
      }
      const { bufs, pooled } = makeBuffers(r, length);
      const target = bufs.length === 1 ? bufs[0] : bufs;
      try {
        if (kind < 12) {
          let pos = offset;
          for (const b of bufs) {
            r.fill(b);
            ref.set(b, pos);
            pos += b.length;
          }
          await disk.write(offset, target);
          n.writes++;
        } else {
          for (const b of bufs) b.fill(0xa5);
          await disk.read(offset, target);
          let pos = offset;
          for (const b of bufs) {
            assertSame(b, ref.subarray(pos, pos + b.length), `read of ${length} at ${offset}`);
            pos += b.length;
          }
          n.reads++;
        }
      } finally {
        for (const b of pooled) sharedPool.give(b);
      }
    });
    ops += batch.length;
    await Promise.all(batch);
  }
  return n;
}

/**
 * Concurrent writes into unallocated blocks: several into different sectors of one new block,
 * whole blocks, and reads of untouched blocks at the same time.
 */
async function allocationRace(disk: Disk, ref: Uint8Array, r: Rng, bs: number) {
  const blocks = Math.floor(disk.size / bs), tasks: Promise<void>[] = [];
  const write = (offset: number, length: number) => {
    const data = r.fill(new Uint8Array(length));
    ref.set(data, offset);
    tasks.push(disk.write(offset, data));
  };
  const picked = new Set<number>();
  while (picked.size < Math.min(8, blocks)) picked.add(r.below(blocks));
  const list = [...picked];
  for (const [i, b] of list.entries()) {
    const [st] = await disk.blockStatus(b * bs, SECTOR);
    assert.equal(st.allocated, false, `block ${b} should start unallocated`);
    if (i < 4) { for (let s = 0; s < 4; s++) write(b * bs + s * (bs / 4), SECTOR); }
    else if (i === 4) write(b * bs, bs);
    else write(b * bs + bs - SECTOR, 2 * SECTOR > disk.size - b * bs ? SECTOR : 2 * SECTOR);
  }
  for (let b = 0; b < blocks && tasks.length < 40; b++) {
    if (picked.has(b)) continue;
    const offset = b * bs, length = Math.min(bs, 64 * KiB);
    tasks.push(
      readRange(disk, offset, length).then((got) => {
        assertSame(got, ref.subarray(offset, offset + length), `read during allocation, ${offset}`);
      }),
    );
  }
  await Promise.all(tasks);
  for (const b of list) {
    const got = await readRange(disk, b * bs, Math.min(bs, disk.size - b * bs));
    assertSame(got, ref.subarray(b * bs, b * bs + got.length), `block ${b} after the race`);
  }
}

async function makeImage(dir: string, c: Config, seed: number): Promise<Uint8Array> {
  if (c.parent === "none") {
    await vhdFormat.create(`${dir}/img.vhd`, { size: SIZE, clusterSize: c.blockSize });
    return new Uint8Array(SIZE);
  }
  const content = writeFile(`${dir}/src.raw`, randomContent(rng(seed), SIZE));
  await qemuImg([
    "convert",
    "-O",
    "vpc",
    "-o",
    `subformat=${c.parent},force_size=on`,
    `${dir}/src.raw`,
    `${dir}/parent.vhd`,
  ]);
  await vhdFormat.create(`${dir}/img.vhd`, {
    size: 0,
    backing: "parent.vhd",
    clusterSize: c.blockSize,
  });
  return content;
}

for (const [i, c] of CONFIGS.entries()) {
  Deno.test(`vhd torture: ${c.name}: ${c.ops} random concurrent requests, reopen`, async () => {
    await withTempDir(async (dir) => {
      const initial = await makeImage(dir, c, 0x100 + i);
      const parentBytes = c.parent === "none" ? null : Deno.readFileSync(`${dir}/parent.vhd`);
      const ref = initial.slice(), r = rng(0x200 + i), path = `${dir}/img.vhd`;
      const outstanding = sharedPool.outstanding;
      let disk: Disk | undefined = await openDisk(`vhd:${path}`);
      try {
        assert.equal(disk.size, SIZE);
        await allocationRace(disk, ref, r, c.blockSize);
        const n = await torture(disk, ref, r, Math.round(c.ops * 2 / 3), c.blockSize);
        assert.ok(n.reads > 100 && n.writes > 100 && n.zeroes > 20, JSON.stringify(n));
        await verifyDisk(disk, ref, "after the first round");
        await disk.flush();
        await disk.close();
        disk = await openDisk(`vhd:${path}`);
        await verifyDisk(disk, ref, "after reopening");
        await torture(disk, ref, r, c.ops - Math.round(c.ops * 2 / 3), c.blockSize);
        await verifyDisk(disk, ref, "after the second round");
        await disk.close();
        disk = undefined;
        assert.equal(sharedPool.outstanding, outstanding, "pool buffers not given back");
        await assertCheckClean(path);
        if (parentBytes !== null) {
          assertSame(Deno.readFileSync(`${dir}/parent.vhd`), parentBytes, "the parent");
        } else {
          writeFile(`${dir}/ref.raw`, ref);
          await assertQemuSame(path, `${dir}/ref.raw`);
          disk = await openDisk(`vhd:${path}`, { readOnly: true });
          await assertMapsAgree(disk, path);
        }
      } finally {
        await disk?.close();
      }
    });
  });
}

Deno.test("vhd torture: a differencing disk's blockStatus follows its bitmaps", async () => {
  await withTempDir(async (dir) => {
    await vhdFormat.create(`${dir}/p.vhd`, { size: 4 * MiB });
    await vhdFormat.create(`${dir}/c.vhd`, { size: 0, backing: "p.vhd" });
    const disk = await openDisk(`vhd:${dir}/c.vhd`);
    try {
      await disk.write(4096, new Uint8Array(1024).fill(1));
      await disk.write(2 * MiB + 512, new Uint8Array(512).fill(2));
      const extents = await disk.blockStatus(0, disk.size);
      assert.deepEqual(extents, [
        { offset: 0, length: 4096, allocated: false, zero: false },
        { offset: 4096, length: 1024, allocated: true, zero: false },
        { offset: 5120, length: 2 * MiB - 4608, allocated: false, zero: false },
        { offset: 2 * MiB + 512, length: 512, allocated: true, zero: false },
        { offset: 2 * MiB + 1024, length: 2 * MiB - 1024, allocated: false, zero: false },
      ]);
    } finally {
      await disk.close();
    }
  });
});
