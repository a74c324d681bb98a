/**
 * The callback form of read/write (BlockTarget.submit, DiskImpl.submit, IoEngine.submit): the
 * request path of the ring and FUSE. Same data and the same refusals as the promise form, and
 * `done` is never called from within the call.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import type { Disk } from "../../drivers/disk.ts";
import { DiskError } from "../../drivers/errors.ts";
import { sharedPool } from "../../io/buffer_pool.ts";
import { VARIANTS } from "./variants.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;

/** Runs one submit; rejects if `done` came synchronously or more than once. */
function submitted(disk: Disk, write: boolean, offset: number, buf: Uint8Array): Promise<void> {
  return new Promise((resolve, reject) => {
    let returned = false, calls = 0;
    disk.submit(write, offset, buf, (e) => {
      calls++;
      if (!returned) reject(new Error("done was called from within submit"));
      else if (calls > 1) reject(new Error("done was called twice"));
      else if (e === null) resolve();
      else reject(e);
    });
    returned = true;
  });
}

/**
 * One round of concurrent callback requests, one per buffer: buffer i works in its own 1/n of the
 * disk (so requests in flight together never overlap), writing (1 in `writeOneIn`) random data
 * recorded in `reference`, or reading and checking against it.
 */
function randomRound(
  disk: Disk,
  bufs: Uint8Array[],
  reference: Uint8Array,
  r: ReturnType<typeof rng>,
  maxBlocks: number,
  writeOneIn: number,
): Promise<unknown> {
  const region = reference.length / bufs.length;
  return Promise.all(bufs.map((b, i) => {
    const length = (1 + r.below(maxBlocks)) * 4096;
    const at = i * region + r.below((region - length) / 4096 + 1) * 4096;
    const buf = b.subarray(0, length);
    if (r.below(writeOneIn) === 0) {
      r.fill(buf);
      reference.set(buf, at);
      return submitted(disk, true, at, buf);
    }
    return submitted(disk, false, at, buf).then(() =>
      assertBytes(buf, reference.subarray(at, at + length), `read at ${at}`)
    );
  }));
}

for (const v of VARIANTS) {
  Deno.test(`submit: ${v.name}: 500 random callback reads and writes match a reference`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      const r = rng(0x5b);
      const reference = r.fill(new Uint8Array(SIZE));
      Deno.writeFileSync(path, reference);
      const disk = await openDisk(`${v.type}:${path}`, v.options);
      const bufs = Array.from({ length: 32 }, () => sharedPool.take(64 * 1024));
      try {
        for (let round = 0; round < 16; round++) await randomRound(disk, bufs, reference, r, 16, 2);
        const back = new Uint8Array(SIZE);
        await disk.read(0, back);
        assertBytes(back, reference, "the whole disk");
      } finally {
        for (const b of bufs) sharedPool.give(b);
        await disk.close();
      }
    });
  });

  Deno.test(`submit: ${v.name}: bad requests fail through the callback; close waits`, async () => {
    await withTempDir(async (dir) => {
      const path = `${dir}/disk.img`;
      Deno.writeFileSync(path, new Uint8Array(SIZE));
      const buf = sharedPool.take(8192);
      try {
        const disk = await openDisk(`${v.type}:${path}`, v.options);
        const code = (e: unknown) => (e as DiskError).code;
        await assert.rejects(submitted(disk, false, 100, buf), (e) => code(e) === "EINVAL");
        await assert.rejects(submitted(disk, true, SIZE - 4096, buf), (e) => code(e) === "ENOSPC");
        await assert.rejects(submitted(disk, false, SIZE, buf), (e) => code(e) === "EINVAL");
        // In flight when close() is called: it completes, and close waits for it.
        buf.fill(7);
        const write = submitted(disk, true, 0, buf);
        await disk.close();
        await write;
        await assert.rejects(submitted(disk, false, 0, buf), (e) => code(e) === "EIO");
        const ro = await openDisk(`${v.type}:${path},ro`, v.options);
        await assert.rejects(submitted(ro, true, 0, buf), (e) => code(e) === "EROFS");
        await submitted(ro, false, 0, buf.fill(0));
        // (A RAM disk is volatile: its writes end with it.)
        const landed = v.type === "ram" ? 0 : 7;
        assert.ok(buf.every((b) => b === landed), "the write before close landed");
        await ro.close();
      } finally {
        sharedPool.give(buf);
      }
    });
  });
}

Deno.test("submit: qcow: allocated clusters go direct, the rest through read/write; all match", async () => {
  await withTempDir(async (dir) => {
    const size = 8 * MiB, r = rng(0x9c0);
    const base = r.fill(new Uint8Array(size));
    Deno.writeFileSync(`${dir}/base.raw`, base);
    const made = await new Deno.Command("qemu-img", {
      args: ["create", "-q", "-f", "qcow", "-b", `${dir}/base.raw`, "-F", "raw", `${dir}/o.qcow`],
    }).output();
    assert.ok(made.success, new TextDecoder().decode(made.stderr));
    const reference = base.slice();
    const disk = await openDisk(`qcow:${dir}/o.qcow`);
    const bufs = Array.from({ length: 16 }, () => sharedPool.take(32 * 1024));
    try {
      // First writes allocate (copying the rest of each cluster from the base); later ones,
      // and reads of written clusters, find them allocated. Some straddle clusters.
      for (let round = 0; round < 40; round++) await randomRound(disk, bufs, reference, r, 8, 3);
    } finally {
      for (const b of bufs) sharedPool.give(b);
      await disk.close();
    }
    const again = await openDisk(`qcow:${dir}/o.qcow`, { readOnly: true });
    try {
      const back = new Uint8Array(size);
      await again.read(0, back);
      assertBytes(back, reference, "the overlay after reopening");
    } finally {
      await again.close();
    }
  });
});

Deno.test("submit: qcow: requests over several clusters, contiguous in the file or not, across an L2 table's end", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/s.qcow`;
    const made = await new Deno.Command("qemu-img", {
      args: ["create", "-q", "-f", "qcow", path, "4M"], // 4 KiB clusters, 2 MiB per L2 table
    }).output();
    assert.ok(made.success, new TextDecoder().decode(made.stderr));
    const reference = new Uint8Array(SIZE), r = rng(0x5eed);
    const disk = await openDisk(`qcow:${path}`);
    const buf = sharedPool.take(256 * 1024);
    try {
      const write = async (at: number, length: number) => {
        const data = r.fill(new Uint8Array(length));
        reference.set(data, at);
        await disk.write(at, data);
      };
      await write(0, 64 * 1024); // one run in the file
      for (let c = 31; c >= 16; c--) await write(c * 4096, 4096); // backwards: no run
      await write(2 * MiB - 32 * 1024, 64 * 1024); // across the first table's end
      await write(40 * 4096, 8 * 4096);
      await write(44 * 4096, 4096); // a hole in a run: 44 now follows 47 in the file
      const cases: [number, number][] = [
        [0, 64 * 1024],
        [4096 + 512, 20 * 1024],
        [16 * 4096, 16 * 4096],
        [12 * 4096, 12 * 4096],
        [2 * MiB - 32 * 1024, 64 * 1024],
        [2 * MiB - 8192, 4096],
        [40 * 4096, 8 * 4096],
        [100 * 4096, 256 * 1024], // nothing allocated
      ];
      for (const [at, length] of cases) {
        const target = buf.subarray(0, length);
        await submitted(disk, false, at, target);
        assertBytes(target, reference.subarray(at, at + length), `read at ${at}+${length}`);
        r.fill(target);
        reference.set(target, at);
        await submitted(disk, true, at, target);
      }
      const back = new Uint8Array(SIZE);
      await disk.read(0, back);
      assertBytes(back, reference, "the whole disk");
    } finally {
      sharedPool.give(buf);
      await disk.close();
    }
  });
});
