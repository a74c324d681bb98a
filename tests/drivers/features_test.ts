/** discard, writeZeroes, blockStatus and flush through every driver. */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import type { Extent } from "../../drivers/driver.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { VARIANTS } from "./variants.ts";
import { assertBytes, readRange, rng, withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;

const RAW_VARIANTS = VARIANTS.filter((v) => v.type !== "ram");

/** Checks the blockStatus contract: contiguous extents from `offset`, at least one, in range. */
function checkExtents(extents: Extent[], offset: number, length: number): void {
  assert.ok(extents.length >= 1, "no extents");
  let pos = offset;
  for (const e of extents) {
    assert.equal(e.offset, pos, `extents not contiguous: ${JSON.stringify(extents)}`);
    assert.ok(e.length > 0 && e.length % 512 === 0, `bad extent ${JSON.stringify(e)}`);
    pos += e.length;
  }
  assert.ok(pos <= offset + length, `extents go past the range: ${JSON.stringify(extents)}`);
}

/** The whole allocation map of a range, calling blockStatus as often as needed. */
async function fullStatus(disk: Disk, offset: number, length: number): Promise<Extent[]> {
  const all: Extent[] = [];
  for (let pos = offset; pos < offset + length;) {
    const part = await disk.blockStatus(pos, offset + length - pos);
    checkExtents(part, pos, offset + length - pos);
    for (const e of part) {
      const prev = all.at(-1);
      if (prev && prev.allocated === e.allocated && prev.zero === e.zero) prev.length += e.length;
      else all.push({ ...e });
    }
    pos = part.at(-1)!.offset + part.at(-1)!.length;
  }
  return all;
}

/** The extents of `extents` that overlap [offset, offset + length). */
function overlapping(extents: Extent[], offset: number, length: number): Extent[] {
  return extents.filter((e) => e.offset < offset + length && offset < e.offset + e.length);
}

const hole = (offset: number, length: number): Extent => ({
  offset,
  length,
  allocated: false,
  zero: true,
});
const data = (offset: number, length: number): Extent => ({
  offset,
  length,
  allocated: true,
  zero: false,
});

for (const v of VARIANTS) {
  const raw = v.type !== "ram";

  Deno.test(`features: ${v.name}: discard and writeZeroes make ranges read as zeros`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      const size = 16 * MiB;
      const ref = rng(0xd15c).fill(new Uint8Array(size));
      Deno.writeFileSync(path, ref);
      const disk = await openDisk(`${v.type}:${path}`, v.options);
      try {
        // [offset, length, operation]: block-aligned and merely sector-aligned ranges.
        const ops: [number, number, (o: number, l: number) => Promise<void>][] = [
          [1 * MiB, 1 * MiB, (o, l) => disk.discard(o, l)],
          [4 * MiB, 1 * MiB, (o, l) => disk.writeZeroes(o, l, { mayUnmap: true })],
          [8 * MiB, 1 * MiB, (o, l) => disk.writeZeroes(o, l, { mayUnmap: false })],
          [10 * MiB, 1 * MiB, (o, l) => disk.writeZeroes(o, l)],
          [12 * MiB + 512, 3 * KiB, (o, l) => disk.discard(o, l)],
          [13 * MiB + 1536, 10 * KiB, (o, l) => disk.writeZeroes(o, l, { mayUnmap: true })],
          [14 * MiB + 3584, 5 * KiB, (o, l) => disk.writeZeroes(o, l, { mayUnmap: false })],
          [size - 512, 512, (o, l) => disk.writeZeroes(o, l, { mayUnmap: true })],
        ];
        for (const [offset, length, op] of ops) {
          await op(offset, length);
          ref.fill(0, offset, offset + length);
        }
        for (const [offset, length] of ops) {
          const around = Math.max(0, offset - 8 * KiB);
          const end = Math.min(size, offset + length + 8 * KiB);
          assertBytes(
            await readRange(disk, around, end - around),
            ref.subarray(around, end),
            `range ${offset}+${length} and its neighbours`,
          );
        }
        // Data written over a discarded range reads back.
        const fresh = rng(5).fill(new Uint8Array(64 * KiB));
        await disk.write(1 * MiB + 128 * KiB, fresh);
        ref.set(fresh, 1 * MiB + 128 * KiB);
        assertBytes(
          await readRange(disk, 1 * MiB, 1 * MiB),
          ref.subarray(1 * MiB, 2 * MiB),
          "rewritten",
        );

        await disk.flush();
        assertBytes(await readRange(disk, 0, size), ref, "whole disk");
      } finally {
        await disk.close();
      }
      if (raw) assertBytes(await Deno.readFile(path), ref, "image file");
    });
  });

  Deno.test(`features: ${v.name}: blockStatus covers the range${raw ? ", punched ranges are holes" : ""}`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      const size = 16 * MiB;
      Deno.writeFileSync(path, rng(0xb10c).fill(new Uint8Array(size)));
      const disk = await openDisk(`${v.type}:${path}`, v.options);
      try {
        await disk.discard(1 * MiB, 1 * MiB);
        await disk.writeZeroes(4 * MiB, 2 * MiB, { mayUnmap: true });
        await disk.writeZeroes(8 * MiB, 1 * MiB, { mayUnmap: false });
        for (const [o, l] of [[0, size], [1 * MiB, 1 * MiB], [512, 3 * MiB], [size - 512, 512]]) {
          checkExtents(await disk.blockStatus(o, l), o, l);
        }
        const all = await fullStatus(disk, 0, size);
        if (!raw) {
          assert.deepEqual(all, [data(0, size)]);
          return;
        }
        assert.deepEqual(await disk.blockStatus(1 * MiB, 1 * MiB), [hole(1 * MiB, 1 * MiB)]);
        assert.deepEqual(await disk.blockStatus(4 * MiB, 2 * MiB), [hole(4 * MiB, 2 * MiB)]);
        assert.deepEqual(overlapping(all, 1 * MiB, 1 * MiB), [hole(1 * MiB, 1 * MiB)]);
        assert.deepEqual(overlapping(all, 4 * MiB, 2 * MiB), [hole(4 * MiB, 2 * MiB)]);
        // A query across the start of a punched range splits there.
        assert.deepEqual(await disk.blockStatus(512 * KiB, 1 * MiB), [
          data(512 * KiB, 512 * KiB),
          hole(1 * MiB, 512 * KiB),
        ]);
        // Zeroed without unmapping: reads as zeros; whatever blockStatus says must be true.
        for (const e of overlapping(all, 8 * MiB, 1 * MiB)) {
          if (e.zero) continue;
          assert.equal(e.allocated, true, JSON.stringify(e));
        }
        assert.deepEqual(overlapping(all, 0, 1 * MiB), [data(0, 1 * MiB)]);
        assert.deepEqual(overlapping(all, 2 * MiB, 2 * MiB), [data(2 * MiB, 2 * MiB)]);
      } finally {
        await disk.close();
      }
    });
  });

  Deno.test(`features: ${v.name}: flush makes writes reach the image`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      const ref = rng(0xf1).fill(new Uint8Array(2 * MiB));
      Deno.writeFileSync(path, ref);
      const disk = await openDisk(`${v.type}:${path}${raw ? "" : ",persist"}`, v.options);
      try {
        await disk.flush(); // nothing to flush
        const buf = rng(0xf2).fill(new Uint8Array(256 * KiB));
        await Promise.all([
          disk.write(64 * KiB, buf),
          disk.write(1 * MiB, buf.subarray(0, 4 * KiB)),
        ]);
        ref.set(buf, 64 * KiB);
        ref.set(buf.subarray(0, 4 * KiB), 1 * MiB);
        await Promise.all([disk.flush(), disk.flush()]);
        assertBytes(await Deno.readFile(path), ref, "image file after flush");
        // Flush concurrent with writes, then one more.
        const w = disk.write(0, buf);
        ref.set(buf, 0);
        await Promise.all([w, disk.flush()]);
        await disk.flush();
        assertBytes(await Deno.readFile(path), ref, "image file after second flush");
      } finally {
        await disk.close();
      }
    });
  });
}

for (const v of RAW_VARIANTS) {
  Deno.test(`features: ${v.name}: blockStatus of a sparse file is hole / data / hole`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/sparse.img`;
      const size = 16 * MiB;
      Deno.writeFileSync(path, new Uint8Array(0));
      Deno.truncateSync(path, size);
      let disk = await openDisk(`${v.type}:${path}`, v.options);
      try {
        assert.equal(disk.size, size);
        assert.deepEqual(await disk.blockStatus(0, size), [hole(0, size)]);
        const payload = rng(0x5a).fill(new Uint8Array(1 * MiB));
        await disk.write(4 * MiB, payload);
        const expected = [hole(0, 4 * MiB), data(4 * MiB, 1 * MiB), hole(5 * MiB, 11 * MiB)];
        // Before and after flush (delayed allocation must not matter).
        assert.deepEqual(await disk.blockStatus(0, size), expected);
        await disk.flush();
        assert.deepEqual(await disk.blockStatus(0, size), expected);
        // Sub-ranges are clipped to the query.
        assert.deepEqual(await disk.blockStatus(2 * MiB, 4 * MiB), [
          hole(2 * MiB, 2 * MiB),
          data(4 * MiB, 1 * MiB),
          hole(5 * MiB, 1 * MiB),
        ]);
        assert.deepEqual(await disk.blockStatus(4 * MiB + 512, 4096), [data(4 * MiB + 512, 4096)]);
        assert.deepEqual(await disk.blockStatus(4 * MiB + 512, 2 * MiB), [
          data(4 * MiB + 512, 1 * MiB - 512),
          hole(5 * MiB, 1 * MiB + 512),
        ]);
        assert.deepEqual(await disk.blockStatus(size - 512, 512), [hole(size - 512, 512)]);
        assert.deepEqual(await disk.blockStatus(0, 512), [hole(0, 512)]);

        // The same map through another driver, and the holes read as zeros.
        await disk.close();
        disk = await openDisk(`sync:${path},ro`);
        assert.deepEqual(await disk.blockStatus(0, size), expected);
        assertBytes(
          await readRange(disk, 3 * MiB, 3 * MiB),
          (() => {
            const e = new Uint8Array(3 * MiB);
            e.set(payload, 1 * MiB);
            return e;
          })(),
          "hole / data / hole",
        );
      } finally {
        await disk.close();
      }
    });
  });

  Deno.test(`features: ${v.name}: blockStatus of a fragmented file may answer a prefix`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/fragmented.img`;
      const size = 16 * MiB, step = 8 * KiB;
      Deno.writeFileSync(path, new Uint8Array(0));
      Deno.truncateSync(path, size);
      const disk = await openDisk(`${v.type}:${path}`, v.options);
      try {
        const block = sharedPool.take(4 * KiB).fill(7);
        try {
          const writes: Promise<void>[] = [];
          for (let off = 0; off < size; off += step) writes.push(disk.write(off, block));
          await Promise.all(writes);
        } finally {
          sharedPool.give(block);
        }
        await disk.flush();
        const first = await disk.blockStatus(0, size);
        checkExtents(first, 0, size);
        // The map is the same however it is asked for.
        const all = await fullStatus(disk, 0, size);
        assert.equal(all.length, 2 * size / step);
        assert.ok(first.length < all.length, "expected a prefix of a 4096-extent map");
        assert.deepEqual(first, all.slice(0, first.length));
        for (const [i, e] of all.entries()) {
          const off = (i >> 1) * step + (i & 1) * 4 * KiB;
          assert.deepEqual(e, i & 1 ? hole(off, 4 * KiB) : data(off, 4 * KiB));
        }
        const mid = await disk.blockStatus(6 * KiB, 4 * KiB);
        assert.deepEqual(mid, [hole(6 * KiB, 2 * KiB), data(8 * KiB, 2 * KiB)]);
      } finally {
        await disk.close();
      }
    });
  });

  Deno.test(`features: ${v.name}: blockStatus of a file whose size is not a sector multiple`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/odd.img`;
      Deno.writeFileSync(path, rng(3).fill(new Uint8Array(5000)));
      let disk = await openDisk(`${v.type}:${path}`, v.options);
      try {
        assert.equal(disk.size, 5120);
        assert.deepEqual(await disk.blockStatus(0, 5120), [data(0, 5120)]);
        assert.deepEqual(await disk.blockStatus(4608, 512), [data(4608, 512)]);
        await disk.close();
        Deno.truncateSync(path, 0);
        Deno.truncateSync(path, 5000);
        disk = await openDisk(`${v.type}:${path}`, v.options);
        assert.deepEqual(await disk.blockStatus(0, 5120), [hole(0, 5120)]);
      } finally {
        await disk.close();
      }
    });
  });
}

for (const v of RAW_VARIANTS) {
  Deno.test(`features: ${v.name}: writeZeroes writes zeros where ZERO_RANGE is unsupported (tmpfs)`, async () => {
    // tmpfs punches holes but has no FALLOC_FL_ZERO_RANGE: writeZeroes without unmap falls back
    // to writing zeros (in 1 MiB pieces).
    const dir = Deno.makeTempDirSync({ dir: "/dev/shm", prefix: "tapd-test-" });
    try {
      const path = `${dir}/disk.img`;
      const size = 8 * MiB;
      const ref = rng(0x7e).fill(new Uint8Array(size));
      Deno.writeFileSync(path, ref);
      const disk = await openDisk(`${v.type}:${path}`, { ...v.options, direct: "auto" });
      try {
        const outstanding = sharedPool.outstanding;
        for (
          const [o, l, mayUnmap] of [
            [512, 3 * MiB, false],
            [4 * MiB, 1 * MiB, true],
            [6 * MiB - 1536, 2560, false],
            [size - 512, 512, false],
          ] as const
        ) {
          await disk.writeZeroes(o, l, { mayUnmap });
          ref.fill(0, o, o + l);
        }
        await disk.discard(7 * MiB, 64 * KiB);
        ref.fill(0, 7 * MiB, 7 * MiB + 64 * KiB);
        assert.equal(sharedPool.outstanding, outstanding, "zero buffer not given back");
        assertBytes(await readRange(disk, 0, size), ref, "whole disk");
        await disk.flush();
      } finally {
        await disk.close();
      }
      assertBytes(await Deno.readFile(path), ref, "image file");
    } finally {
      Deno.removeSync(dir, { recursive: true });
    }
  });
}
