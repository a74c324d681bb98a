/**
 * FUSE over io_uring (fuse/uring.ts): a raw disk's aligned reads and writes are served by the
 * ring threads with io_uring I/O, everything else is handed to the event loop and answered
 * through the ring; the gate still counts and holds them; a mapped disk falls back to /dev/fuse;
 * SIGKILL of the server leaves no stuck mount. The export runs in this process in the first
 * tests, so the file is used only from child processes (dd).
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { abortFuseMount, FuseExport } from "../../fuse/export.ts";
import { ENABLE_URING } from "../../fuse/uring.ts";
import { DiskGate } from "../../serve/gate.ts";
import { assertBytes, rng, withTempDir } from "../util.ts";
import {
  checkLostRequests,
  checkPauseAndReopen,
  cleanupMount,
  fuseLoopUnavailable,
  FuseServe,
  fuseUnavailable,
  isMounted,
  makeFileSystem,
  MiB,
  mountPointFile,
  rawImage,
  ROOT,
  run,
  runOk,
  sleep,
  stuckOnFuse,
  verifyAll,
} from "./helpers.ts";

function uringUnavailable(): string | null {
  try {
    Deno.statSync(ENABLE_URING);
  } catch {
    return "the kernel has no FUSE over io_uring";
  }
  return fuseUnavailable();
}
const skip = uringUnavailable();
const skipLoop = skip ?? fuseLoopUnavailable();

function slice(path: string, offset: number, length: number): Uint8Array {
  return Deno.readFileSync(path).subarray(offset, offset + length);
}

function dd(args: string[]): Promise<{ code: number; stderr: string }> {
  return run("dd", [...args, "status=none"]);
}

async function served(
  spec: string,
  mp: string,
  fn: (gate: DiskGate, fuse: FuseExport) => Promise<void>,
  options: { readOnly?: boolean } = {},
): Promise<void> {
  const gate = new DiskGate(await openDisk(spec, { readOnly: options.readOnly }));
  const fuse = new FuseExport(gate, mp, { ...options, uring: true });
  try {
    await fuse.mount();
    await fn(gate, fuse);
    await fuse.close();
    assert.notEqual(
      gate.stats().readAhead,
      null,
      "read-ahead is back once the ring threads are gone",
    );
  } finally {
    await cleanupMount(mp);
    await gate.close();
  }
}

Deno.test({
  name: "fuse uring: aligned reads and writes through the ring threads, counted; unaligned " +
    "writes, fsync and attributes through the event loop, answered on the ring",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 16 * MiB);
      const data = rng(17).fill(new Uint8Array(MiB)), small = rng(18).fill(new Uint8Array(2331));
      Deno.writeFileSync(`${dir}/data`, data);
      Deno.writeFileSync(`${dir}/small`, small);
      await served(`tap:aio:${img}`, mp, async (gate, fuse) => {
        assert.equal(fuse.uring, true);
        const w = await dd([`if=${dir}/data`, `of=${mp}`, "bs=64k", "seek=64", "conv=notrunc"]
          .concat("oflag=direct"));
        assert.equal(w.code, 0, w.stderr);
        assertBytes(slice(img, 4 * MiB, MiB), data, "the image after direct writes");
        const r = await dd([`if=${mp}`, `of=${dir}/back`, "bs=64k", "skip=64", "count=16"]
          .concat("iflag=direct"));
        assert.equal(r.code, 0, r.stderr);
        assertBytes(Deno.readFileSync(`${dir}/back`), data, "direct reads");
        // 1 MiB requests: the largest an entry carries.
        const big = await dd([`if=${dir}/data`, `of=${mp}`, "bs=1M", "seek=8", "conv=notrunc"]
          .concat("oflag=direct"));
        assert.equal(big.code, 0, big.stderr);
        // Buffered and unaligned, then fsync: handed to the event loop, answered on the ring.
        const u = await dd([`if=${dir}/small`, `of=${mp}`, "bs=777", "seek=9", "conv=notrunc"]
          .concat("conv=fsync"));
        assert.equal(u.code, 0, u.stderr);
        const size = await run("stat", ["-c", "%s", mp]);
        assert.equal(size.stdout.trim(), String(16 * MiB));
        const s = gate.stats();
        assert.ok(s.ops.write.requests >= 17, JSON.stringify(s.ops.write));
        assert.ok(s.ops.write.bytes >= 2 * MiB + small.length, JSON.stringify(s.ops.write));
        assert.ok(s.ops.read.bytes >= MiB, JSON.stringify(s.ops.read));
        assert.equal(s.ops.write.errors, 0);
      });
      assertBytes(slice(img, 777 * 9, small.length), small, "the unaligned write");
      assertBytes(slice(img, 4 * MiB, MiB), data, "the direct writes, after close");
      assertBytes(slice(img, 8 * MiB, MiB), data, "the 1 MiB writes");
    });
  },
});

Deno.test({
  name: "fuse uring: pause holds the ring's writes until resume; after a resume on another " +
    "image every write goes there",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const mp = mountPointFile(`${dir}/d`);
      await checkPauseAndReopen(dir, mp, 11, (img, fn) => served(`tap:aio:${img}`, mp, fn));
    });
  },
});

Deno.test({
  name: "fuse uring: a ring thread that fails with requests in flight ends the connection: the " +
    "writer gets an error, not a hang; the disk closes and the path mounts again",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      await checkLostRequests(dir, mountPointFile(`${dir}/d`), { uring: true }, /io_uring thread/);
    });
  },
});

Deno.test({
  name: "fuse uring: a read-only export refuses writes; a qcow disk falls back to /dev/fuse",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/d`);
      rawImage(img, 4 * MiB);
      const data = rng(13).fill(new Uint8Array(MiB));
      Deno.writeFileSync(`${dir}/data`, data);
      await served(`tap:aio:${img}`, mp, async (_gate, fuse) => {
        assert.equal(fuse.uring, true);
        const w = await dd([`if=${dir}/data`, `of=${mp}`, "bs=64k", "seek=32", "oflag=direct"]);
        assert.notEqual(w.code, 0);
        assert.match(w.stderr, /Read-only file system|Operation not permitted/);
      }, { readOnly: true });
      assertBytes(slice(img, 2 * MiB, MiB), new Uint8Array(MiB), "the read-only image");

      const qcow = `${dir}/disk.qcow`;
      await runOk(`${ROOT}tapd`, ["qcow-create", "4", qcow]);
      await served(`tap:qcow:${qcow}`, mp, async (_gate, fuse) => {
        assert.equal(fuse.uring, false);
        const w = await dd([`if=${dir}/data`, `of=${mp}`, "bs=64k", "seek=16", "oflag=direct"]
          .concat("conv=notrunc"));
        assert.equal(w.code, 0, w.stderr);
        const r = await dd([`if=${mp}`, `of=${dir}/back`, "bs=64k", "skip=16", "count=16"]);
        assert.equal(r.code, 0, r.stderr);
        assertBytes(Deno.readFileSync(`${dir}/back`), data, "the qcow disk");
      });
    });
  },
});

Deno.test({
  name: "fuse uring: ext4 written through the ring reads back through /dev/fuse, e2fsck clean",
  ignore: skipLoop !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(img, 256 * MiB);
      const sums = await makeFileSystem(`tap:aio:${img}`, mp, mnt, 21, ["--fuse-uring"]);
      await verifyAll(`tap:aio:${img}`, mp, mnt, [sums]);
    });
  },
});

Deno.test({
  name: "fuse uring: SIGKILL of tapd serve mid-I/O leaves no stuck mount; remount works",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 64 * MiB);
      const serve = await FuseServe.start(`tap:aio:${img}`, mp, { extra: ["--fuse-uring"] });
      let writer: Deno.ChildProcess | null = null;
      try {
        writer = new Deno.Command("dd", {
          args: ["if=/dev/zero", `of=${mp}`, "bs=64k", "count=100000", "oflag=direct"],
          stdout: "null",
          stderr: "null",
        }).spawn();
        await sleep(300);
        serve.kill();
        await serve.wait();
        abortFuseMount(mp);
        assert.equal(isMounted(mp), false, "the FUSE mount is still there");
        const done = await Promise.race([writer.status, sleep(20_000).then(() => null)]);
        assert.notEqual(done, null, "the writer is stuck");
        writer = null;
        assert.deepEqual(stuckOnFuse(), [], "processes left in D state on FUSE");
      } finally {
        if (writer !== null) {
          try {
            writer.kill("SIGKILL");
          } catch { /* gone */ }
          await writer.status;
        }
        serve.kill();
        await serve.wait();
        await cleanupMount(mp);
      }
      const again = await FuseServe.start(`tap:aio:${img}`, mp, { extra: ["--fuse-uring"] });
      try {
        assert.equal(Deno.statSync(mp).size, 64 * MiB);
      } finally {
        await again.stop();
      }
      assert.equal(isMounted(mp), false);
    });
  },
});
