/**
 * ByteIo (file semantics over a disk) against a shadow copy, without FUSE: random unaligned and
 * aligned writes, many at once in the same sectors; zeroing and punching with unaligned edges;
 * SEEK_DATA/SEEK_HOLE. And the mountinfo parser.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { ByteIo } from "../../fuse/byte_io.ts";
import { parseMountInfo } from "../../fuse/mount.ts";
import { SEEK_DATA, SEEK_HOLE } from "../../ffi/constants.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { assertBytes, readRange, rng, withTempDir } from "../util.ts";

const SIZE = 4 * 1024 * 1024;

Deno.test("ByteIo: concurrent unaligned writes, zeroing and punching match a shadow copy", async () => {
  await withTempDir(async (dir) => {
    const img = `${dir}/disk.img`;
    const f = Deno.openSync(img, { create: true, write: true });
    f.truncateSync(SIZE);
    f.close();
    const disk = await openDisk(`tap:aio:${img}`, {});
    try {
      const io = new ByteIo(disk);
      const shadow = new Uint8Array(SIZE);
      const r = rng(11);
      for (let round = 0; round < 5; round++) {
        const writes: Promise<void>[] = [];
        for (let i = 0; i < 40; i++) {
          // Small writes clustered in a few sectors, so that patches overlap sector-wise.
          const off = (r.below(8) * 4096 + r.below(4096)) % (SIZE - 9000);
          const len = 1 + r.below(i % 5 === 0 ? 9000 : 700);
          const data = r.fill(new Uint8Array(len));
          shadow.set(data, off);
          writes.push(io.write(off, data));
        }
        await Promise.all(writes);
      }
      const zeroAt = 100_003, zeroLen = 300_001;
      await io.zero(zeroAt, zeroLen, false);
      shadow.fill(0, zeroAt, zeroAt + zeroLen);
      const punchAt = 1_000_001, punchLen = 1_500_000;
      r.fill(shadow.subarray(punchAt - 5000, punchAt + punchLen + 5000));
      await io.write(punchAt - 5000, shadow.slice(punchAt - 5000, punchAt + punchLen + 5000));
      await io.zero(punchAt, punchLen, true);
      shadow.fill(0, punchAt, punchAt + punchLen);
      assertBytes(await readRange(disk, 0, SIZE), shadow, "disk contents");
      // Unaligned reads through readInto.
      const area = sharedPool.take(64 * 1024);
      try {
        const skip = await io.readInto(area, 513, 20_000);
        assertBytes(area.subarray(skip, skip + 20_000), shadow.subarray(513, 20_513), "readInto");
      } finally {
        sharedPool.give(area);
      }
      // The punched range is a hole of the file system (whole blocks of it at least).
      assert.equal(
        await io.seek(punchAt + 8192, SEEK_DATA),
        punchAt + punchLen - (punchAt + punchLen) % 4096,
      );
      const hole = await io.seek(0, SEEK_HOLE);
      assert.ok(hole !== null && hole < punchAt + 4096, `first hole at ${hole}`);
      assert.equal(await io.seek(SIZE, SEEK_DATA), null);
      assert.equal(await io.seek(SIZE - 1, SEEK_HOLE), SIZE - 1);
    } finally {
      await disk.close();
    }
  });
});

Deno.test("parseMountInfo reads mount points with escapes and the file system type", () => {
  const text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw\n" +
    "80 36 0:55 / /var/tmp/a\\040b/disk rw,nosuid,nodev - fuse.tapd tapd:aio:/x.img rw,fd=7\n";
  const mounts = parseMountInfo(text);
  assert.equal(mounts.length, 2);
  assert.deepEqual(mounts[1], {
    mountId: 80,
    major: 0,
    minor: 55,
    mountPoint: "/var/tmp/a b/disk",
    fsType: "fuse.tapd",
    source: "tapd:aio:/x.img",
  });
  assert.equal(mounts[0].fsType, "ext3");
});
