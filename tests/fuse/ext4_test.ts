/**
 * ext4 on a loop device (direct I/O) over the FUSE file, end to end, on a raw image, a qcow
 * image and a qcow overlay over a raw parent: mkfs, a tree of files with checksums, unmount,
 * detach, stop tapd; serve again, re-attach, every checksum, `e2fsck -fn` clean. fstrim on the
 * mounted file system must punch holes in the image.
 */
import assert from "node:assert/strict";
import { withTempDir } from "../util.ts";
import {
  allocated,
  fuseLoopUnavailable,
  makeFileSystem,
  makeTree,
  MiB,
  mounted,
  mountPointFile,
  onLoop,
  rawImage,
  ROOT,
  runOk,
  verifyAll,
  verifyTree,
  writeTree,
} from "./helpers.ts";

const skip = fuseLoopUnavailable();
const SIZE_MB = 256;

Deno.test({
  name: "ext4 over FUSE over a raw image: files survive a re-attach, e2fsck clean, fstrim holes",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(img, SIZE_MB * MiB);
      const sums = await makeFileSystem(`tap:aio:${img}`, mp, mnt, 1);
      await verifyAll(`tap:aio:${img}`, mp, mnt, [sums]);
      // fstrim: a deleted file's blocks become holes in the image.
      await onLoop(`tap:aio:${img}`, mp, async (loop) => {
        await mounted(loop, mnt, async () => {
          await runOk("dd", [
            "if=/dev/urandom",
            `of=${mnt}/big`,
            "bs=1M",
            "count=48",
            "conv=fsync",
          ]);
          await runOk("sync", []);
          const before = allocated(img);
          Deno.removeSync(`${mnt}/big`);
          await runOk("sync", []);
          await runOk("fstrim", [mnt]);
          const after = allocated(img);
          assert.ok(
            before - after >= 40 * MiB,
            `fstrim freed only ${(before - after) / MiB} MiB (${before} → ${after} bytes)`,
          );
          await verifyTree(mnt, sums);
        });
      });
      await verifyAll(`tap:aio:${img}`, mp, mnt, [sums]);
    });
  },
});

/** Bytes `qemu-img map` reports as data in an image. */
async function mappedData(image: string): Promise<number> {
  const r = await runOk("qemu-img", ["map", "--output=json", image]);
  const map = JSON.parse(r.stdout) as { length: number; data: boolean; depth: number }[];
  return map.filter((e) => e.data && e.depth === 0).reduce((n, e) => n + e.length, 0);
}

Deno.test({
  name: "ext4 over FUSE over a qcow image: files survive a re-attach, fstrim unmaps clusters",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.qcow`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      await runOk(`${ROOT}tapd`, ["qcow-create", String(SIZE_MB), img]);
      const spec = `tap:qcow:${img}`;
      const sums = await makeFileSystem(spec, mp, mnt, 2);
      await verifyAll(spec, mp, mnt, [sums]);
      await onLoop(spec, mp, async (loop) => {
        await mounted(loop, mnt, async () => {
          await runOk("dd", [
            "if=/dev/urandom",
            `of=${mnt}/big`,
            "bs=1M",
            "count=32",
            "conv=fsync",
          ]);
        });
      });
      const before = await mappedData(img);
      await onLoop(spec, mp, async (loop) => {
        await mounted(loop, mnt, async () => {
          Deno.removeSync(`${mnt}/big`);
          await runOk("sync", []);
          await runOk("fstrim", [mnt]);
        });
      });
      const after = await mappedData(img);
      assert.ok(before - after >= 24 * MiB, `qemu-img map: data ${before} → ${after} bytes`);
      await verifyAll(spec, mp, mnt, [sums]);
    });
  },
});

async function sha256File(path: string): Promise<string> {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", Deno.readFileSync(path)));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

Deno.test({
  name: "ext4 over FUSE over a qcow overlay of a raw parent: both trees kept, parent unchanged",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const parent = `${dir}/parent.img`, overlay = `${dir}/overlay.qcow`;
      const mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(parent, SIZE_MB * MiB);
      const first = await makeFileSystem(`tap:aio:${parent}`, mp, mnt, 3);
      const parentSum = await sha256File(parent);
      await runOk(`${ROOT}tapd`, ["qcow-create", String(SIZE_MB), overlay, parent]);
      const spec = `tap:qcow:${overlay}`;
      let second = new Map<string, string>();
      await onLoop(spec, mp, async (loop) => {
        await mounted(loop, mnt, async () => {
          await verifyTree(mnt, first);
          second = await writeTree(`${mnt}/second`, makeTree(4, 20));
          await runOk("sync", []);
        });
      });
      await verifyAll(spec, mp, mnt, [
        first,
        new Map([...second].map(([k, v]) => [`second/${k}`, v])),
      ]);
      assert.equal(await sha256File(parent), parentSum, "the parent image changed");
      await runOk("e2fsck", ["-fn", parent]);
    });
  },
});
