/**
 * Allocating writes at depth, the way a guest's first copy of a large file arrives: 1 MiB writes
 * 16 at a time into a fresh image, each one allocating 256 clusters in L2 tables that other
 * writes are filling at the same moment. The file grows in allocated steps ahead of the writes;
 * a clean close gives back what was reserved and not used; QEMU reads the same bytes.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../../drivers/mod.ts";
import { newImageBytes, parseHeader } from "../../../drivers/qcow/header.ts";
import { rng, withTempDir } from "../../util.ts";
import { assertMapsAgree, assertQemuSame, MiB, verifyDisk, writeFile } from "./helpers.ts";

const SIZE = 256 * MiB, WRITTEN = 96 * MiB, DEPTH = 16;

for (const clusterBits of [12, 16]) {
  Deno.test(`qcow growth: ${DEPTH} concurrent 1 MiB allocating writes, clusters of ${2 ** clusterBits} bytes`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/img.qcow`;
      writeFile(
        path,
        newImageBytes({ size: SIZE, clusterBits, l2Bits: clusterBits === 12 ? 9 : 13 }),
      );
      const ref = new Uint8Array(SIZE);
      const r = rng(0x6e0 + clusterBits);
      const disk = await openDisk(`qcow:${path}`);
      try {
        // Sequential 1 MiB pieces, plus an odd-sized one at a cluster-unaligned offset after each
        // 8 MiB (the head and tail clusters are copied on write, the middle comes from the data).
        let next = 0;
        const worker = async () => {
          while (next < WRITTEN) {
            const offset = next;
            next += MiB;
            const data = r.fill(new Uint8Array(MiB));
            ref.set(data, offset);
            await disk.write(offset, data);
            if (offset % (8 * MiB) === 0) {
              const at = WRITTEN + offset / 8 + 1536, odd = r.fill(new Uint8Array(200 * 1024));
              ref.set(odd, at);
              await disk.write(at, odd);
            }
          }
        };
        await Promise.all(Array.from({ length: DEPTH }, worker));
        const open = Deno.statSync(path);
        assert.ok(open.size > WRITTEN, `the file holds the data (${open.size})`);
        assert.ok(
          open.blocks! * 512 >= open.size - 2 * MiB,
          `grown with allocated space, not holes (${open.blocks! * 512} of ${open.size})`,
        );
        await verifyDisk(disk, ref, "while open");
      } finally {
        await disk.close();
      }
      const closed = Deno.statSync(path).size;
      const tables = Math.ceil(SIZE / 2 ** (clusterBits + (clusterBits === 12 ? 9 : 13)));
      const most = 64 * 1024 + tables * 2 ** clusterBits * 8 + WRITTEN + 12 * 2 ** 17 + 2 * MiB;
      assert.ok(closed < most, `close gives back the reserve (${closed} ≥ ${most})`);
      writeFile(`${dir}/ref.raw`, ref);
      await assertQemuSame(path, `${dir}/ref.raw`);
      const again = await openDisk(`qcow:${path}`, { readOnly: true });
      try {
        await verifyDisk(again, ref, "after reopening");
        await assertMapsAgree(again, path);
      } finally {
        await again.close();
      }
    });
  });
}

/** The L1 entries of the qcow image at `path`, read from the file. */
function l1Entries(path: string): bigint[] {
  const bytes = Deno.readFileSync(path);
  const h = parseHeader(bytes.subarray(0, 4096), bytes.length, path);
  const v = new DataView(bytes.buffer, bytes.byteOffset + h.l1Offset, h.l1Size * 8);
  return Array.from({ length: h.l1Size }, (_, i) => v.getBigUint64(i * 8));
}

Deno.test("qcow growth: a write into a table's last quarter has the next table made ahead; QEMU agrees", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/img.qcow`, TABLE = 2 * MiB; // 4 KiB clusters, 512 entries a table
    writeFile(path, newImageBytes({ size: 4 * TABLE, clusterBits: 12, l2Bits: 9 }));
    const ref = new Uint8Array(4 * TABLE);
    const r = rng(0x7ab);
    const disk = await openDisk(`qcow:${path}`);
    try {
      const put = async (offset: number, length: number) => {
        const data = r.fill(new Uint8Array(length));
        ref.set(data, offset);
        await disk.write(offset, data);
      };
      // Writes in every table, some in a last quarter whose next table exists already, one in
      // the last cluster of the last table (no table past the disk may be made).
      await put(0, 64 * 1024);
      await put(TABLE + TABLE / 2, 4096);
      await put(3 * TABLE + TABLE - 4096, 4096);
      await put(TABLE - 8192, 8192);
      await put(2 * TABLE + (TABLE * 3) / 4, 4096);
    } finally {
      await disk.close();
    }
    assert.deepEqual(l1Entries(path).map((e) => e !== 0n), [true, true, true, true]);

    const fresh = `${dir}/fresh.qcow`;
    writeFile(fresh, newImageBytes({ size: 4 * TABLE, clusterBits: 12, l2Bits: 9 }));
    const d2 = await openDisk(`qcow:${fresh}`);
    try {
      // One write in table 1's last quarter: table 2 is made ahead, table 0 and 3 are not.
      await d2.write(TABLE + (TABLE * 3) / 4, r.fill(new Uint8Array(4096)));
    } finally {
      await d2.close();
    }
    assert.deepEqual(l1Entries(fresh).map((e) => e !== 0n), [false, true, true, false]);

    writeFile(`${dir}/ref.raw`, ref);
    await assertQemuSame(path, `${dir}/ref.raw`);
  });
});
