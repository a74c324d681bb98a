/**
 * Ending a FUSE export: SIGKILL of the serving process mid-I/O, then abortFuseMount() (no stuck
 * mount, nobody left in D state, a new mount on the same path works); SIGTERM while a loop
 * device holds the file (a clear error, serving goes on until the loop device is detached);
 * SIGTERM twice forces it; and FuseExport used in-process as the daemon will.
 */
import assert from "node:assert/strict";
import { openDisk } from "../../drivers/mod.ts";
import { abortFuseMount, FuseExport } from "../../fuse/export.ts";
import { withTempDir } from "../util.ts";
import {
  cleanupMount,
  eventually,
  fuseLoopUnavailable,
  FuseServe,
  fuseUnavailable,
  isMounted,
  loopAttach,
  MiB,
  mountPointFile,
  rawImage,
  run,
  runOk,
  sleep,
  stuckOnFuse,
} from "./helpers.ts";

const skipLoop = fuseLoopUnavailable();
const skip = fuseUnavailable();

Deno.test({
  name: "SIGKILL of tapd serve mid-I/O: abortFuseMount leaves no stuck mount, remount works",
  ignore: skipLoop !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), mnt = `${dir}/mnt`;
      rawImage(img, 256 * MiB);
      Deno.mkdirSync(mnt);
      const serve = await FuseServe.start(img, mp);
      let loop = "";
      let writer: Deno.ChildProcess | null = null;
      try {
        loop = await loopAttach(mp);
        await runOk("mkfs.ext4", ["-q", "-F", loop]);
        await runOk("mount", [loop, mnt]);
        writer = new Deno.Command("dd", {
          args: ["if=/dev/zero", `of=${mnt}/f`, "bs=1M", "count=200", "oflag=direct"],
          stdout: "null",
          stderr: "null",
        }).spawn();
        await sleep(300);
        serve.kill();
        await serve.wait();
        assert.equal(abortFuseMount(mp), true, "abortFuseMount found no mount");
        assert.equal(isMounted(mp), false, "the FUSE mount is still there");
        // The writer sees I/O errors instead of hanging.
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
        await run("umount", ["-l", mnt]);
        if (loop !== "") await run("losetup", ["-d", loop]);
        serve.kill();
        await serve.wait();
        await cleanupMount(mp);
      }
      assert.equal(abortFuseMount(mp), false, "nothing is mounted any more");
      // A new mount on the same path works.
      const again = await FuseServe.start(img, mp);
      try {
        assert.equal(Deno.statSync(mp).size, 256 * MiB);
        await runOk("e2fsck", ["-n", mp]).catch(() => {}); // readable, whatever ext4 says
      } finally {
        await again.stop();
      }
      assert.equal(isMounted(mp), false);
    });
  },
});

Deno.test({
  name: "SIGTERM while a loop device holds the file: a clear error, serving goes on until detached",
  ignore: skipLoop !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 64 * MiB);
      const serve = await FuseServe.start(img, mp);
      let loop = "";
      try {
        loop = await loopAttach(mp);
        serve.signal("SIGTERM");
        assert.ok(
          await eventually(() => /Cannot unmount .* the file is in use/.test(serve.stderr), 15_000),
          `no busy message:\n${serve.stderr}`,
        );
        // Still serving through the loop device.
        await runOk("dd", [`if=${loop}`, "of=/dev/null", "bs=1M", "count=4", "iflag=direct"]);
        await runOk("losetup", ["-d", loop]);
        loop = "";
        const status = await serve.wait(20_000);
        assert.equal(status.code, 0, serve.stderr);
        assert.equal(isMounted(mp), false);
      } finally {
        if (loop !== "") await run("losetup", ["-d", loop]);
        serve.kill();
        await serve.wait();
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "SIGTERM twice while the file is busy aborts the mount and exits 0",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 16 * MiB);
      const serve = await FuseServe.start(img, mp);
      // A reader holding the file open keeps it busy.
      const holder = new Deno.Command("sh", {
        args: ["-c", `exec 3<"${mp}"; sleep 60`],
        stdout: "null",
        stderr: "null",
      }).spawn();
      try {
        await sleep(200);
        serve.signal("SIGTERM");
        assert.ok(await eventually(() => /file is in use/.test(serve.stderr), 15_000));
        serve.signal("SIGTERM");
        const status = await serve.wait(20_000);
        assert.equal(status.code, 0, serve.stderr);
        assert.equal(isMounted(mp), false);
      } finally {
        try {
          holder.kill("SIGKILL");
        } catch { /* gone */ }
        await holder.status;
        serve.kill();
        await serve.wait();
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "FuseExport in-process: mount, serve, close; ended resolves; errors are one line",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, 8 * MiB);
      const disk = await openDisk(`tap:aio:${img}`, {});
      try {
        const fuse = new FuseExport(disk, mp, { readOnly: true });
        await fuse.mount();
        assert.equal(fuse.mounted, true);
        await assert.rejects(fuse.mount(), /already mounted/);
        // Only other processes may use the file: this thread serves it.
        const r = await run("dd", [`if=${mp}`, "of=/dev/null", "bs=1M", "iflag=direct"]);
        assert.equal(r.code, 0, r.stderr);
        assert.match(r.stderr, /8388608 bytes/);
        const w = await run("dd", ["if=/dev/zero", `of=${mp}`, "count=1", "conv=notrunc"]);
        assert.notEqual(w.code, 0);
        await fuse.close();
        await fuse.ended;
        assert.equal(fuse.mounted, false);
        assert.ok(fuse.requests > 0);
        await fuse.close(); // idempotent
        assert.equal(isMounted(mp), false);
        await assert.rejects(
          new FuseExport(disk, `${dir}/nope`).mount(),
          /Cannot mount on ".*nope": no such file/,
        );
      } finally {
        await cleanupMount(mp);
        await disk.close();
      }
    });
  },
});
