/**
 * FUSE I/O threads (fuse/io_threads.ts): a raw disk's aligned reads and writes are served by
 * Workers on clones of /dev/fuse, everything else by the event loop; the gate in front still
 * counts them, holds them while paused, and sends them to the new image after a resume on one.
 * The export runs in this process, so the file is used only from child processes (dd).
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { FuseExport } from "../../fuse/export.ts";
import { DiskGate } from "../../serve/gate.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";
import {
  checkLostRequests,
  checkPauseAndReopen,
  cleanupMount,
  fuseLoopUnavailable,
  fuseUnavailable,
  makeFileSystem,
  MiB,
  mountPointFile,
  rawImage,
  run,
  verifyAll,
} from "./helpers.ts";

const skip = fuseUnavailable();

function slice(path: string, offset: number, length: number): Uint8Array {
  return Deno.readFileSync(path).subarray(offset, offset + length);
}

/** dd of `data` into `file` at byte `offset` in blocks of `bs` (O_DIRECT unless `buffered`). */
function ddWrite(
  data: string,
  file: string,
  offset: number,
  bs: number,
  buffered = false,
): Promise<{ code: number; stderr: string }> {
  return run("dd", [
    `if=${data}`,
    `of=${file}`,
    `bs=${bs}`,
    `seek=${offset / bs}`,
    "conv=notrunc",
    ...(buffered ? [] : ["oflag=direct"]),
    "status=none",
  ]);
}

async function served(
  img: string,
  mp: string,
  fn: (gate: DiskGate, fuse: FuseExport) => Promise<void>,
  options: { ioThreads?: number; readOnly?: boolean } = { ioThreads: 2 },
): Promise<void> {
  const gate = new DiskGate(await openDisk(`tap:aio:${img}`, { readOnly: options.readOnly }));
  const fuse = new FuseExport(gate, mp, options);
  try {
    await fuse.mount();
    await fn(gate, fuse);
    await fuse.close();
    assert.notEqual(gate.stats().readAhead, null, "read-ahead is back once the threads are gone");
  } finally {
    await cleanupMount(mp);
    await gate.close();
  }
}

Deno.test({
  name: "io threads: aligned reads and writes go through the threads and are counted; " +
    "unaligned ones through the event loop",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 16 * MiB);
      const data = rng(7).fill(new Uint8Array(MiB)), small = rng(8).fill(new Uint8Array(3 * 777));
      Deno.writeFileSync(`${dir}/data`, data);
      Deno.writeFileSync(`${dir}/small`, small);
      await served(img, mp, async (gate, fuse) => {
        assert.equal(fuse.ioThreads, 2);
        const w = await ddWrite(`${dir}/data`, mp, 4 * MiB, 64 * 1024);
        assert.equal(w.code, 0, w.stderr);
        assertBytes(slice(img, 4 * MiB, MiB), data, "the image after direct writes");
        const r = await run("dd", [
          `if=${mp}`,
          `of=${dir}/back`,
          "bs=64k",
          `skip=${4 * MiB / 65536}`,
          "count=16",
          "iflag=direct",
          "status=none",
        ]);
        assert.equal(r.code, 0, r.stderr);
        assertBytes(Deno.readFileSync(`${dir}/back`), data, "direct reads");
        // Buffered and unaligned: the kernel sends the byte range as it is.
        const u = await ddWrite(`${dir}/small`, mp, 777 * 9, 777, true);
        assert.equal(u.code, 0, u.stderr);
        // The event loop saw INIT, attributes, opens, closes and the unaligned write: fewer
        // than the 32 aligned reads and writes alone.
        assert.ok(fuse.requests < 32, `the event loop served ${fuse.requests} requests`);
        const s = gate.stats();
        assert.ok(s.ops.write.requests >= 16, JSON.stringify(s.ops.write));
        assert.ok(s.ops.write.bytes >= MiB + small.length, JSON.stringify(s.ops.write));
        assert.ok(s.ops.read.bytes >= MiB, JSON.stringify(s.ops.read));
        assert.equal(s.ops.write.errors, 0);
      });
      assertBytes(slice(img, 777 * 9, small.length), small, "the unaligned write");
      assertBytes(slice(img, 4 * MiB, MiB), data, "the direct writes, after close");
    });
  },
});

Deno.test({
  name: "io threads: pause holds their writes until resume; after a resume on another image " +
    "every write goes there",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const mp = mountPointFile(`${dir}/d`);
      await checkPauseAndReopen(dir, mp, 1, (img, fn) => served(img, mp, fn));
    });
  },
});

Deno.test({
  name: "io threads: none by default (the event loop serves everything); a read-only export " +
    "refuses writes",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/d`);
      rawImage(img, 4 * MiB);
      const data = rng(3).fill(new Uint8Array(MiB));
      Deno.writeFileSync(`${dir}/data`, data);
      await served(img, mp, async (_gate, fuse) => {
        assert.equal(fuse.ioThreads, 0);
        const w = await ddWrite(`${dir}/data`, mp, MiB, 64 * 1024);
        assert.equal(w.code, 0, w.stderr);
      }, {});
      assertBytes(slice(img, MiB, MiB), data, "the image");
      await served(img, mp, async (_gate, fuse) => {
        assert.equal(fuse.ioThreads, 2);
        const w = await ddWrite(`${dir}/data`, mp, 2 * MiB, 64 * 1024);
        assert.notEqual(w.code, 0);
        assert.match(w.stderr, /Read-only file system|Operation not permitted/);
      }, { readOnly: true, ioThreads: 2 });
      assertBytes(slice(img, 2 * MiB, MiB), new Uint8Array(MiB), "the read-only image");
    });
  },
});

Deno.test({
  name: "io threads: ext4 written through them reads back through the event loop, e2fsck clean",
  ignore: fuseLoopUnavailable() !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(img, 256 * MiB);
      const sums = await makeFileSystem(`tap:aio:${img}`, mp, mnt, 11, ["--io-threads", "2"]);
      await verifyAll(`tap:aio:${img}`, mp, mnt, [sums]);
    });
  },
});

Deno.test({
  name: "io threads: a thread that fails with requests in flight ends the connection: the " +
    "writer gets an error, not a hang; the disk closes and the path mounts again",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      await checkLostRequests(dir, mountPointFile(`${dir}/d`), { ioThreads: 1 }, /I\/O thread/);
    });
  },
});
