/**
 * `tapd serve tap:aio:RAW --fuse PATH --passthrough`: the kernel reads and writes the raw image
 * itself for opens of the file (FUSE passthrough), and tapd serves only the rest (attributes,
 * fsync, fallocate, lseek). Data written either way reads back the same through the file and
 * the image, buffered and O_DIRECT, unaligned too; ext4 on a loop device over it survives a
 * re-attach without passthrough, fstrim still punches holes, a read-only export refuses writes,
 * and a disk that is not raw is refused with one line. Where the kernel has no passthrough
 * (before Linux 6.9), tapd says so and serves everything itself: the same checks hold.
 */
import assert from "node:assert/strict";
import { assertBytes, rng, withTempDir } from "../util.ts";
import {
  allocated,
  fuseLoopUnavailable,
  FuseServe,
  fuseUnavailable,
  makeTree,
  MiB,
  mounted,
  mountPointFile,
  onLoop,
  pread,
  pwrite,
  rawImage,
  ROOT,
  run,
  runOk,
  verifyTree,
  withFuse,
  writeTree,
} from "./helpers.ts";

const SIZE = 64 * MiB;
const skip = fuseUnavailable();
const skipLoop = fuseLoopUnavailable();

/**
 * Whether the serve's log says passthrough is on; if it says it is off, that must be for want
 * of kernel support, said in one warning.
 */
function passthroughOn(serve: FuseServe): boolean {
  if (/msg=mounted.*passthrough=true|passthrough=true.*msg=mounted/.test(serve.stderr)) {
    return true;
  }
  assert.match(serve.stderr, /FUSE passthrough is off: tapd serves reads and writes itself/);
  return false;
}

/** The request count the serve logged when it unmounted. */
function requestsServed(serve: FuseServe): number {
  const m = serve.stderr.match(/requests=(\d+) msg=unmounted/);
  assert.ok(m !== null, `no unmount line in:\n${serve.stderr}`);
  return Number(m[1]);
}

Deno.test({
  name: "FUSE passthrough: the kernel moves the data, tapd answers the rest; bytes match both ways",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      const r = rng(11);
      const serve = await FuseServe.start(`tap:aio:${img}`, mp, { extra: ["--passthrough"] });
      let on = false;
      try {
        on = passthroughOn(serve);
        assert.equal(Deno.statSync(mp).size, SIZE);
        // Buffered, unaligned: the image's own page cache serves them (no O_DIRECT EINVAL).
        const pieces: [number, Uint8Array][] = [
          [3, r.fill(new Uint8Array(100))],
          [4096 * 5 + 511, r.fill(new Uint8Array(9000))],
          [SIZE - 300, r.fill(new Uint8Array(300))],
        ];
        for (const [off, data] of pieces) pwrite(mp, off, data);
        for (const [off, data] of pieces) assertBytes(pread(mp, off, data.length), data, `@${off}`);
        // 48 MiB of O_DIRECT writes in 64 KiB requests, read back O_DIRECT.
        const src = `${dir}/src`;
        Deno.writeFileSync(src, r.fill(new Uint8Array(48 * MiB)));
        await runOk("dd", [
          `if=${src}`,
          `of=${mp}`,
          "bs=64k",
          "seek=128",
          "oflag=direct",
          "conv=notrunc,fsync",
        ]);
        await runOk("dd", [`if=${mp}`, `of=${dir}/back`, "bs=64k", "skip=128", "count=768"]);
        assertBytes(Deno.readFileSync(`${dir}/back`), Deno.readFileSync(src), "O_DIRECT trip");
        // fsync goes to tapd, which flushes the image.
        {
          using f = Deno.openSync(mp, { read: true, write: true });
          f.syncSync();
        }
      } finally {
        await serve.stop();
      }
      // The image itself holds every byte.
      for (const [off, data] of [[8 * MiB, Deno.readFileSync(`${dir}/src`)] as const]) {
        assertBytes(pread(img, off, data.length), data, "image after O_DIRECT");
      }
      const served = requestsServed(serve);
      if (on) assert.ok(served < 200, `tapd answered ${served} requests: the data came through`);
      else assert.ok(served > 768, `without passthrough tapd answers the writes (${served})`);
    });
  },
});

Deno.test({
  name: "FUSE passthrough: ext4 on a direct-I/O loop device, fstrim holes, then served normally",
  ignore: skipLoop !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(img, 256 * MiB);
      let sums = new Map<string, string>();
      await onLoop(`tap:aio:${img}`, mp, async (loop) => {
        await runOk("mkfs.ext4", ["-q", "-F", loop]);
        await mounted(loop, mnt, async () => {
          sums = await writeTree(mnt, makeTree(5));
          await runOk("dd", ["if=/dev/urandom", `of=${mnt}/big`, "bs=1M", "count=48"]);
          await runOk("sync", []);
          const before = allocated(img);
          Deno.removeSync(`${mnt}/big`);
          await runOk("sync", []);
          await runOk("fstrim", [mnt]);
          const after = allocated(img);
          assert.ok(before - after >= 40 * MiB, `fstrim freed ${(before - after) / MiB} MiB`);
        });
        await runOk("e2fsck", ["-fn", loop]);
      }, ["--passthrough"]);
      // The same image served through tapd's own data path.
      await onLoop(`tap:aio:${img}`, mp, async (loop) => {
        await mounted(loop, mnt, () => verifyTree(mnt, sums));
        await runOk("e2fsck", ["-fn", loop]);
      });
    });
  },
});

Deno.test({
  name: "FUSE passthrough: a read-only export refuses writes; a disk tapd maps is refused",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      pwrite(img, 4096, new Uint8Array(4096).fill(9));
      await withFuse(`tap:aio:${img}`, mp, async () => {
        assert.equal(pread(mp, 4096, 1)[0], 9);
        assert.throws(() => Deno.openSync(mp, { write: true }), /Read-only file system/);
        const dd = await run("dd", [
          "if=/dev/zero",
          `of=${mp}`,
          "bs=4k",
          "count=1",
          "conv=notrunc",
        ]);
        assert.notEqual(dd.code, 0);
      }, { readOnly: true, extra: ["--passthrough"] });
      assert.equal(pread(img, 4096, 1)[0], 9);

      const qcow = `${dir}/disk.qcow`;
      await runOk(`${ROOT}tapd`, ["qcow-create", "16M", qcow]);
      let r = await run(`${ROOT}tapd`, [
        "serve",
        `tap:qcow:${qcow}`,
        "--fuse",
        mp,
        "--passthrough",
      ]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /^tapd: FUSE passthrough needs a raw disk .* is mapped by tapd$/m);
      assert.equal(r.stderr.trim().split("\n").filter((l) => l.startsWith("tapd:")).length, 1);
      assert.equal(Deno.statSync(mp).size, 0, "nothing was mounted");
      r = await run(`${ROOT}tapd`, [
        "serve",
        `tap:aio:${img}`,
        "--nbd",
        `unix:${dir}/s`,
        "--passthrough",
      ]);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /--passthrough is an option of --fuse PATH/);
      r = await run(`${ROOT}tapd`, [
        "serve",
        `tap:aio:${img}`,
        "--fuse",
        mp,
        "--passthrough",
        "--io-threads",
        "2",
      ]);
      assert.equal(r.code, 2);
      assert.match(r.stderr, /^tapd: serve: --passthrough and --io-threads both choose who serves/);
      assert.equal(Deno.statSync(mp).size, 0, "nothing was mounted");
    });
  },
});
