/**
 * Random-write torture against a reference buffer: partial grains, whole grains, writes across
 * grain-table and extent boundaries, concurrent batches, over a parent; write zeroes and discard;
 * then reopen and compare the whole disk (tapd and qemu-img).
 */
import assert from "node:assert/strict";
import type { Disk } from "../../../drivers/disk.ts";
import { openDisk } from "../../../drivers/mod.ts";
import { vmdkFormat } from "../../../drivers/vmdk/format.ts";
import { type Rng, rng, withTempDir } from "../../util.ts";
import {
  assertQemuCheck,
  assertQemuSameVmdk,
  KiB,
  MiB,
  randomContent,
  randomWrites,
  readRange,
  sameBytes,
  SECTOR,
  verifyDisk,
  verifyRandomReads,
  writeFile,
} from "./helpers.ts";

/** Rounds of random writes, zeroes and discards, each followed by random reads. */
async function torture(disk: Disk, ref: Uint8Array, r: Rng, grain: number, gtSpan: number) {
  for (let round = 0; round < 6; round++) {
    await randomWrites(disk, ref, r, 64, grain, gtSpan);
    const zOff = r.below(disk.size / SECTOR - 64) * SECTOR, zLen = (1 + r.below(64)) * SECTOR;
    await disk.writeZeroes(zOff, zLen);
    ref.fill(0, zOff, zOff + zLen);
    // Discard leaves the range unspecified: each sector now reads as zeros or as before.
    const dOff = r.below(disk.size / grain - 2) * grain, dLen = (1 + r.below(2)) * grain;
    await disk.discard(dOff, dLen);
    const now = await readRange(disk, dOff, dLen);
    for (let s = 0; s < dLen; s += SECTOR) {
      const got = now.subarray(s, s + SECTOR), old = ref.subarray(dOff + s, dOff + s + SECTOR);
      assert.ok(got.every((b) => b === 0) || sameBytes(got, old), `discard at ${dOff + s}`);
    }
    ref.set(now, dOff);
    await verifyRandomReads(disk, ref, r, 24, grain, `round ${round}`);
  }
}

Deno.test("vmdk torture: 4 KiB grains over a parent, across grain tables, reopened", async () => {
  await withTempDir(async (dir) => {
    const SIZE = 9 * MiB + 3584, grain = 4 * KiB, gtSpan = 512 * grain;
    const parent = randomContent(rng(1), SIZE, 4 * KiB);
    await vmdkFormat.create(`${dir}/p.vmdk`, { size: SIZE, clusterSize: 64 * KiB });
    let disk = await openDisk(`vmdk:${dir}/p.vmdk`);
    try {
      await disk.write(0, parent);
    } finally {
      await disk.close();
    }
    await vmdkFormat.create(`${dir}/c.vmdk`, { size: SIZE, clusterSize: grain, backing: "p.vmdk" });
    const ref = parent.slice();
    disk = await openDisk(`vmdk:${dir}/c.vmdk`);
    try {
      await torture(disk, ref, rng(2), grain, gtSpan);
    } finally {
      await disk.close();
    }
    disk = await openDisk(`vmdk:${dir}/c.vmdk`, { readOnly: true });
    try {
      await verifyDisk(disk, ref, "reopened child");
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuCheck(`${dir}/c.vmdk`);
    await assertQemuSameVmdk(`${dir}/c.vmdk`, `${dir}/ref.raw`);
    const report = await vmdkFormat.check(`${dir}/c.vmdk`);
    assert.deepEqual([report.errors, report.leaks], [[], []]);
  });
});

Deno.test("vmdk torture: standalone 64 KiB grains with discard, reopened", async () => {
  await withTempDir(async (dir) => {
    const SIZE = 40 * MiB, grain = 64 * KiB;
    await vmdkFormat.create(`${dir}/a.vmdk`, { size: SIZE, extra: { zeroed_grain: "on" } });
    const ref = new Uint8Array(SIZE);
    let disk = await openDisk(`vmdk:${dir}/a.vmdk`);
    try {
      await torture(disk, ref, rng(3), grain, 32 * MiB);
    } finally {
      await disk.close();
    }
    disk = await openDisk(`vmdk:${dir}/a.vmdk`, { readOnly: true });
    try {
      await verifyDisk(disk, ref, "reopened", 4 * MiB);
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuCheck(`${dir}/a.vmdk`);
    await assertQemuSameVmdk(`${dir}/a.vmdk`, `${dir}/ref.raw`);
    const report = await vmdkFormat.check(`${dir}/a.vmdk`);
    assert.deepEqual(report.errors, []);
  });
});

Deno.test("vmdk torture: a descriptor of sparse, flat and vmfs extents, writes across them", async () => {
  await withTempDir(async (dir) => {
    // Three sparse extents (their own descriptors are ignored), a flat one at an offset.
    // Only the last extent may end inside a grain (QEMU reads past a partial grain otherwise).
    const parts = [3 * MiB, 2 * MiB + 4096, 5 * MiB + 512];
    for (const [k, size] of parts.entries()) {
      await vmdkFormat.create(`${dir}/x${k}.vmdk`, { size, clusterSize: 4096 });
    }
    Deno.writeFileSync(`${dir}/flat.bin`, new Uint8Array(4 * MiB + 1024));
    Deno.writeFileSync(`${dir}/vmfs.bin`, new Uint8Array(MiB));
    const lines = [
      `RW ${parts[0] / SECTOR} SPARSE "x0.vmdk"`,
      `RW ${(4 * MiB) / SECTOR} FLAT "flat.bin" 2`,
      `RW ${parts[1] / SECTOR} SPARSE "x1.vmdk"`,
      `RW ${MiB / SECTOR} VMFS "vmfs.bin"`,
      `RW ${parts[2] / SECTOR} SPARSE "x2.vmdk"`,
    ];
    const text = `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n` +
      `createType="twoGbMaxExtentSparse"\n\n# Extent description\n${lines.join("\n")}\n\n` +
      `# The Disk Data Base\n#DDB\n\nddb.adapterType = "ide"\n`;
    Deno.writeTextFileSync(`${dir}/multi.vmdk`, text);
    const size = parts[0] + parts[1] + parts[2] + 5 * MiB;
    const ref = new Uint8Array(size);
    let disk = await openDisk(`vmdk:${dir}/multi.vmdk`);
    try {
      assert.equal(disk.size, size);
      await torture(disk, ref, rng(4), 4096, 2 * MiB);
      // Writes straddling every extent boundary.
      let at = 0;
      for (const n of [parts[0], 4 * MiB, parts[1], MiB]) {
        at += n;
        const data = rng(at).fill(new Uint8Array(12 * KiB));
        ref.set(data, at - 6 * KiB);
        await disk.write(at - 6 * KiB, data);
      }
    } finally {
      await disk.close();
    }
    disk = await openDisk(`vmdk:${dir}/multi.vmdk`, { readOnly: true });
    try {
      await verifyDisk(disk, ref, "reopened multi-extent disk");
    } finally {
      await disk.close();
    }
    // Same length on rewrite: only the CID changed.
    const now = Deno.readTextFileSync(`${dir}/multi.vmdk`);
    assert.equal(now.length, text.length);
    assert.notEqual(now, text);
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuSameVmdk(`${dir}/multi.vmdk`, `${dir}/ref.raw`);
    const report = await vmdkFormat.check(`${dir}/multi.vmdk`);
    assert.deepEqual(report.errors, []);
  });
});

Deno.test("vmdk torture: grain tables allocated at run time (GD entries cleared)", async () => {
  await withTempDir(async (dir) => {
    const SIZE = 8 * MiB, grain = 4 * KiB, gtSpan = 512 * grain;
    const path = `${dir}/g.vmdk`;
    await vmdkFormat.create(path, { size: SIZE, clusterSize: grain });
    // Unhook every grain table: VMware's and QEMU's images have them all, but others may not.
    const bytes = Deno.readFileSync(path), v = new DataView(bytes.buffer);
    for (const field of [48, 56]) {
      const gd = Number(v.getBigUint64(field, true)) * SECTOR;
      bytes.fill(0, gd, gd + 4 * (SIZE / gtSpan));
    }
    Deno.writeFileSync(path, bytes);
    const ref = new Uint8Array(SIZE);
    let disk = await openDisk(`vmdk:${path}`);
    try {
      await torture(disk, ref, rng(5), grain, gtSpan);
    } finally {
      await disk.close();
    }
    disk = await openDisk(`vmdk:${path}`, { readOnly: true });
    try {
      await verifyDisk(disk, ref, "reopened");
    } finally {
      await disk.close();
    }
    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuCheck(path);
    await assertQemuSameVmdk(path, `${dir}/ref.raw`);
    const report = await vmdkFormat.check(path);
    assert.deepEqual(report.errors, []);
  });
});
