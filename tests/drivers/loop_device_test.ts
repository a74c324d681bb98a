/**
 * A block device target (what a partition looks like to tapd): a loop device over an image
 * file. Needs root and losetup; otherwise the test is reported as ignored, with the reason.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import type { DiskOptions } from "../../drivers/driver.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { assertBytes, loopUnavailable, losetup, type Rng, rng, tempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;
const SIZE = 64 * MiB;

const why = loopUnavailable();

const VARIANTS: { name: string; type: "aio" | "sync"; options: DiskOptions }[] = [
  { name: "aio (libaio)", type: "aio", options: { engine: "aio" } },
  { name: "aio (io_uring)", type: "aio", options: { engine: "uring" } },
  { name: "sync", type: "sync", options: {} },
];

async function randomIo(disk: Disk, ref: Uint8Array, r: Rng, ops: number): Promise<void> {
  for (let done = 0; done < ops; done += 16) {
    // 16 requests at a time, each in its own 4 MiB stripe so that none overlap.
    await Promise.all(Array.from({ length: 16 }, async (_, i) => {
      const stripe = (r.below(SIZE / (4 * MiB) / 16) * 16 + i) * 4 * MiB;
      const length = (1 + r.below(128)) * 512;
      const offset = stripe + r.below((4 * MiB - length) / 512 + 1) * 512;
      const pooled = r.below(2) === 1;
      const buf = pooled ? sharedPool.take(length) : new Uint8Array(length);
      try {
        if (r.below(2)) {
          r.fill(buf);
          ref.set(buf, offset);
          await disk.write(offset, buf);
        } else {
          await disk.read(offset, buf);
          assertBytes(buf, ref.subarray(offset, offset + length), `read of ${length} at ${offset}`);
        }
      } finally {
        if (pooled) sharedPool.give(buf);
      }
    }));
  }
}

async function readAll(disk: Disk, offset: number, length: number): Promise<Uint8Array> {
  const out = new Uint8Array(length);
  const chunk = sharedPool.take(Math.min(length, 4 * MiB));
  try {
    for (let pos = 0; pos < length; pos += chunk.length) {
      const view = chunk.subarray(0, Math.min(chunk.length, length - pos));
      await disk.read(offset + pos, view);
      out.set(view, pos);
    }
  } finally {
    sharedPool.give(chunk);
  }
  return out;
}

for (const [vi, v] of VARIANTS.entries()) {
  const name = `loop device target: ${v.name}`;
  Deno.test({
    name: why === null ? name : `${name} (skipped: needs root and losetup; ${why})`,
    ignore: why !== null,
    async fn() {
      const dir = tempDir("tapd-loop-");
      let device: string | null = null;
      let disk: Disk | undefined;
      try {
        const image = `${dir}/disk.img`;
        const r = rng(0x100b + vi);
        const ref = r.fill(new Uint8Array(SIZE));
        Deno.writeFileSync(image, ref);
        const attached = losetup("--find", "--show", image);
        assert.ok(attached.ok && attached.out.startsWith("/dev/loop"), `losetup: ${attached.out}`);
        device = attached.out;

        disk = await openDisk(`${v.type}:${device}`, v.options);
        assert.equal(disk.size, SIZE);
        assert.equal(disk.info.logicalSectorSize, 512);
        assert.ok(disk.info.physicalSectorSize >= 512, `physical ${disk.info.physicalSectorSize}`);
        assert.equal(disk.info.readOnly, false);
        // A block device reports itself as one allocated extent.
        assert.deepEqual(await disk.blockStatus(0, SIZE), [
          { offset: 0, length: SIZE, allocated: true, zero: false },
        ]);

        await randomIo(disk, ref, r, 1600);

        // Discard and write zeroes on the device.
        for (
          const [offset, length, op] of [
            [8 * MiB, 1 * MiB, () => disk!.discard(8 * MiB, 1 * MiB)],
            [16 * MiB, 256 * KiB, () => disk!.writeZeroes(16 * MiB, 256 * KiB, { mayUnmap: true })],
            [20 * MiB, 128 * KiB, () => disk!.writeZeroes(20 * MiB, 128 * KiB)],
            [24 * MiB + 4096, 8192, () => disk!.writeZeroes(24 * MiB + 4096, 8192)],
          ] as const
        ) {
          await op();
          ref.fill(0, offset, offset + length);
          const around = offset - 64 * KiB;
          assertBytes(
            await readAll(disk, around, length + 128 * KiB),
            ref.subarray(around, offset + length + 64 * KiB),
            `zeroed range ${offset}+${length}`,
          );
        }

        await disk.flush();
        assertBytes(await readAll(disk, 0, SIZE), ref, "whole device");
        await disk.close();
        disk = undefined;

        const detached = losetup("-d", device);
        assert.ok(detached.ok, `losetup -d: ${detached.out}`);
        device = null;
        assertBytes(await Deno.readFile(image), ref, "backing file");
      } finally {
        await disk?.close();
        if (device !== null) losetup("-d", device);
        Deno.removeSync(dir, { recursive: true });
      }
    },
  });
}

Deno.test({
  name: why === null
    ? "loop device target: read-only device spec"
    : `loop device target: read-only device spec (skipped: needs root and losetup; ${why})`,
  ignore: why !== null,
  async fn() {
    const dir = tempDir("tapd-loop-");
    let device: string | null = null;
    try {
      const image = `${dir}/disk.img`;
      const ref = rng(0x10ad).fill(new Uint8Array(4 * MiB + 512));
      Deno.writeFileSync(image, ref);
      const attached = losetup("--find", "--show", image);
      assert.ok(attached.ok, attached.out);
      device = attached.out;
      for (const type of ["aio", "sync"]) {
        const disk = await openDisk(`${type}:${device},ro`);
        try {
          assert.equal(disk.info.readOnly, true);
          assert.equal(disk.size, 4 * MiB + 512);
          assertBytes(await readAll(disk, 0, disk.size), ref, `${type}: whole device`);
          await assert.rejects(disk.write(0, new Uint8Array(512)), /EROFS/);
        } finally {
          await disk.close();
        }
      }
    } finally {
      if (device !== null) losetup("-d", device);
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: why === null
    ? "loop device target: 4Kn device (4096-byte logical sectors)"
    : `loop device target: 4Kn device (skipped: needs root and losetup; ${why})`,
  ignore: why !== null,
  async fn() {
    const dir = tempDir("tapd-loop-");
    let device: string | null = null;
    try {
      const image = `${dir}/disk.img`;
      const ref = rng(0x4096).fill(new Uint8Array(16 * MiB));
      Deno.writeFileSync(image, ref);
      const attached = losetup("--find", "--show", "--sector-size", "4096", image);
      if (!attached.ok) {
        console.log(`losetup --sector-size 4096 unsupported here: ${attached.out}`);
        return;
      }
      device = attached.out;
      for (const v of VARIANTS) {
        const disk = await openDisk(`${v.type}:${device}`, v.options);
        try {
          assert.equal(disk.info.logicalSectorSize, 4096, v.name);
          assert.equal(disk.size, 16 * MiB);
          const b = new Uint8Array(512);
          await assert.rejects(disk.read(512, b), /EINVAL/);
          await assert.rejects(disk.read(0, b), /EINVAL/);
          await assert.rejects(disk.discard(4096, 512), /EINVAL/);
          const w = rng(seedOf(v.name)).fill(new Uint8Array(12 * KiB));
          await disk.write(8 * KiB, w);
          ref.set(w, 8 * KiB);
          await disk.discard(1 * MiB, 64 * KiB);
          ref.fill(0, 1 * MiB, 1 * MiB + 64 * KiB);
          await disk.writeZeroes(2 * MiB, 8 * KiB);
          ref.fill(0, 2 * MiB, 2 * MiB + 8 * KiB);
          await disk.flush();
          assertBytes(await readAll(disk, 0, 4 * MiB), ref.subarray(0, 4 * MiB), v.name);
        } finally {
          await disk.close();
        }
      }
      assert.ok(losetup("-d", device).ok);
      device = null;
      assertBytes(await Deno.readFile(image), ref, "backing file");
    } finally {
      if (device !== null) losetup("-d", device);
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

function seedOf(name: string): number {
  return [...name].reduce((h, c) => h * 31 + c.charCodeAt(0), 7) >>> 0;
}
