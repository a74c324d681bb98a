/**
 * Random concurrent reads and writes through every driver, checked byte for byte against a
 * reference copy of the image kept in memory.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import type { DiskOptions } from "../../drivers/driver.ts";
import { ramObjectName } from "../../drivers/ram.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { Buffer } from "node:buffer";
import { assertBytes as slowAssertBytes, type Rng, rng, withTempDir } from "../util.ts";

const KiB = 1024, MiB = 1024 * KiB;
const SECTOR = 512;
const IMAGE_SIZE = 32 * MiB;
const MAX_LEN = 256 * KiB;
const BATCH = 32;
const OPS = 3200;

interface Variant {
  name: string;
  type: "aio" | "sync" | "ram";
  options: DiskOptions;
  /** Requests to issue (default OPS). */
  ops?: number;
}

const VARIANTS: Variant[] = [
  { name: "aio (libaio)", type: "aio", options: { engine: "aio" } },
  { name: "aio (io_uring)", type: "aio", options: { engine: "uring" } },
  { name: "sync", type: "sync", options: {} },
  { name: "ram", type: "ram", options: {} },
  // A shallow queue: most requests wait for a free slot.
  { name: "aio (libaio, depth 4)", type: "aio", options: { engine: "aio", depth: 4 }, ops: 1000 },
  {
    name: "aio (io_uring, depth 4)",
    type: "aio",
    options: { engine: "uring", depth: 4 },
    ops: 1000,
  },
];

/** Writes a random image of `size` bytes and returns its contents. */
function makeImage(path: string, size: number, r: Rng): Uint8Array {
  const bytes = r.fill(new Uint8Array(size));
  Deno.writeFileSync(path, bytes);
  return bytes;
}

/** Up to `BATCH` random sector-aligned ranges of the disk, none overlapping another. */
function randomRanges(r: Rng, size: number): { offset: number; length: number }[] {
  const ranges: { offset: number; length: number }[] = [];
  for (let tries = 0; ranges.length < BATCH && tries < BATCH * 4; tries++) {
    const length = (1 + r.below(MAX_LEN / SECTOR)) * SECTOR;
    const offset = r.below((size - length) / SECTOR + 1) * SECTOR;
    if (ranges.some((x) => offset < x.offset + x.length && x.offset < offset + length)) continue;
    ranges.push({ offset, length });
  }
  return ranges;
}

interface Segments {
  /** What goes to the disk: one buffer or a scatter-gather list. */
  bufs: Uint8Array | Uint8Array[];
  /** The pool buffers among them, to give back. */
  pooled: Uint8Array<ArrayBuffer>[];
}

/**
 * Buffers for `length` bytes: sometimes one buffer, sometimes 2-5 segments (each a multiple of
 * 512 bytes), each from the shared pool or plain JS memory (some at an odd byte offset).
 */
function makeBuffers(r: Rng, length: number): Segments {
  const sectors = length / SECTOR;
  const count = sectors >= 2 && r.below(3) === 0 ? Math.min(sectors, 2 + r.below(4)) : 1;
  // Split `sectors` into `count` positive parts.
  const cuts = new Set<number>();
  while (cuts.size < count - 1) cuts.add(1 + r.below(sectors - 1));
  const bounds = [0, ...[...cuts].sort((a, b) => a - b), sectors];
  const pooled: Uint8Array<ArrayBuffer>[] = [];
  const list: Uint8Array[] = [];
  for (let i = 0; i < count; i++) {
    const n = (bounds[i + 1] - bounds[i]) * SECTOR;
    switch (r.below(3)) {
      case 0: {
        const b = sharedPool.take(n);
        pooled.push(b);
        list.push(b);
        break;
      }
      case 1:
        list.push(new Uint8Array(n));
        break;
      default: {
        const skew = 1 + r.below(63);
        list.push(new Uint8Array(n + skew).subarray(skew));
      }
    }
  }
  return { bufs: count === 1 && r.below(2) === 0 ? list[0] : list, pooled };
}

/** assertBytes with a native fast path for the (usual) equal case. */
function assertBytes(actual: Uint8Array, expected: Uint8Array, what: string): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.length);
  const b = Buffer.from(expected.buffer, expected.byteOffset, expected.length);
  if (!a.equals(b)) slowAssertBytes(actual, expected, what);
}

function segments(bufs: Uint8Array | Uint8Array[]): Uint8Array[] {
  return bufs instanceof Uint8Array ? [bufs] : bufs;
}

/** Runs `count` random reads and writes in concurrent batches; keeps `ref` equal to the disk. */
async function torture(
  disk: Disk,
  ref: Uint8Array,
  r: Rng,
  count = OPS,
): Promise<{ reads: number; writes: number }> {
  let reads = 0, writes = 0, ops = 0;
  while (ops < count) {
    const batch = randomRanges(r, disk.size).map(async ({ offset, length }) => {
      const segs = makeBuffers(r, length);
      try {
        if (r.below(2) === 0) {
          let pos = offset;
          for (const b of segments(segs.bufs)) {
            r.fill(b);
            ref.set(b, pos); // no other request of the batch touches this range
            pos += b.length;
          }
          await disk.write(offset, segs.bufs);
          writes++;
        } else {
          for (const b of segments(segs.bufs)) b.fill(0xa5);
          await disk.read(offset, segs.bufs);
          let pos = offset;
          for (const b of segments(segs.bufs)) {
            assertBytes(b, ref.subarray(pos, pos + b.length), `read of ${length} at ${offset}`);
            pos += b.length;
          }
          reads++;
        }
      } finally {
        for (const b of segs.pooled) sharedPool.give(b);
      }
    });
    ops += batch.length;
    await Promise.all(batch);
  }
  return { reads, writes };
}

/** Reads the whole disk in 4 MiB chunks and compares it with `ref`. */
async function verifyDisk(disk: Disk, ref: Uint8Array): Promise<void> {
  assert.equal(disk.size, ref.length);
  const chunk = sharedPool.take(4 * MiB);
  try {
    for (let off = 0; off < disk.size; off += chunk.length) {
      const n = Math.min(chunk.length, disk.size - off);
      const view = chunk.subarray(0, n);
      await disk.read(off, view);
      assertBytes(view, ref.subarray(off, off + n), `disk at ${off}`);
    }
  } finally {
    sharedPool.give(chunk);
  }
}

function shmExists(path: string): boolean {
  try {
    Deno.statSync(`/dev/shm${ramObjectName(Deno.realPathSync(path))}`);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

for (const [i, v] of VARIANTS.entries()) {
  Deno.test(`torture: ${v.name}: ${v.ops ?? OPS} random concurrent reads and writes`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      const r = rng(0x7a9d + i);
      const initial = makeImage(path, IMAGE_SIZE, r);
      const ref = initial.slice();
      const outstanding = sharedPool.outstanding;
      const spec = `${v.type}:${path}`;
      let disk: Disk | undefined = await openDisk(spec, v.options);
      try {
        assert.equal(disk.size, IMAGE_SIZE);
        assert.equal(disk.info.readOnly, false);
        const { reads, writes } = await torture(disk, ref, r, v.ops);
        assert.ok(reads > 200 && writes > 200, `reads ${reads}, writes ${writes}`);
        await verifyDisk(disk, ref);
        await disk.flush();
        await disk.close();
        disk = undefined;
        assert.equal(sharedPool.outstanding, outstanding, "pool buffers not given back");

        if (v.type === "ram") {
          // Volatile: the image file is never written, and the shared object is gone.
          assertBytes(
            await Deno.readFile(path),
            initial,
            "image file after closing a volatile ram disk",
          );
          assert.equal(shmExists(path), false, "shared memory object left behind");
        } else {
          assertBytes(await Deno.readFile(path), ref, "image file");
          disk = await openDisk(spec, v.options);
          await verifyDisk(disk, ref);
          await disk.close();
          disk = undefined;
        }
      } finally {
        await disk?.close();
      }
    });
  });
}

Deno.test("torture: ram,persist: flush writes every change back to the file", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/disk.img`;
    const r = rng(0x5e51);
    const initial = makeImage(path, IMAGE_SIZE, r);
    const ref = initial.slice();
    let disk: Disk | undefined = await openDisk(`ram:${path},persist`);
    try {
      await torture(disk, ref, r);
      // Before a flush the file is untouched.
      assertBytes(await Deno.readFile(path), initial, "image file before flush");
      await disk.flush();
      assertBytes(await Deno.readFile(path), ref, "image file after flush");

      // Changes after the flush are written by the last close.
      await torture(disk, ref, r, 1000);
      await verifyDisk(disk, ref);
      await disk.close();
      disk = undefined;
      assertBytes(await Deno.readFile(path), ref, "image file after close");
      assert.equal(shmExists(path), false, "shared memory object left behind");

      // A fresh RAM disk loads the persisted contents.
      disk = await openDisk(`ram:${path}`);
      await verifyDisk(disk, ref);
    } finally {
      await disk?.close();
    }
  });
});
