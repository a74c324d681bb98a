/**
 * FUSE exports under the daemon: `tapd ctl attach SPEC --fuse PATH` (alone and next to NBD), I/O
 * through the file, `list`, a detach refused while the file is in use (the disk serves on), a
 * detach that unmounts (also of a paused disk); a tapdisk killed mid-write: the disk is failed,
 * the daemon has aborted the mount (nothing in D state, the path is a plain file again) and the
 * path can be attached again; the daemon's SIGTERM unmounts. `--fuse-uring`: FUSE over io_uring,
 * and its usage errors.
 */
import assert from "node:assert/strict";
import {
  cleanupMount,
  eventually,
  fuseUnavailable,
  isMounted,
  mountPointFile,
  sleep,
  stuckOnFuse,
} from "../fuse/helpers.ts";
import { MiB, qemuIo, rawImage, tapd, TestDaemon, unixUri, withDaemon } from "./helpers.ts";

const skip = fuseUnavailable();
/** The fuse module's FUSE over io_uring switch (Linux 6.14+), or null without it. */
const ENABLE_URING = "/sys/module/fuse/parameters/enable_uring";
const noUring = skip ?? (() => {
  try {
    Deno.statSync(ENABLE_URING);
    return null;
  } catch {
    return "no FUSE over io_uring in this kernel";
  }
})();

/** The line of /proc/self/mountinfo whose mount point is `path`, or undefined. */
function mountLine(path: string): string | undefined {
  return Deno.readTextFileSync("/proc/self/mountinfo").split("\n")
    .find((line) => line.split(" ")[4] === path);
}

function pattern(byte: number, length: number): Uint8Array<ArrayBuffer> {
  return new Uint8Array(length).fill(byte);
}

async function waitForState(d: TestDaemon, id: number, state: string) {
  let disk = (await d.list()).find((x) => x.id === id)!;
  for (let i = 0; i < 50 && disk.state !== state; i++) {
    await sleep(100);
    disk = (await d.list()).find((x) => x.id === id)!;
  }
  return disk;
}

/** Disk `id` once its exports have all ended (or after 5 s). */
async function waitForNoExports(d: TestDaemon, id: number) {
  let disk = (await d.list()).find((x) => x.id === id)!;
  for (let i = 0; i < 50 && disk.exports.length > 0; i++) {
    await sleep(100);
    disk = (await d.list()).find((x) => x.id === id)!;
  }
  return disk;
}

Deno.test({
  name: "daemon: attach --fuse serves the disk as a file; detach refused while busy, then unmounts",
  ignore: skip !== null,
  async fn() {
    await withDaemon(async (d) => {
      const img = rawImage(d, "a.img", 16 * MiB);
      const mp = mountPointFile(`${d.dir}/a.disk`);
      const before = Deno.statSync(mp);
      let holder: Deno.ChildProcess | null = null;
      try {
        // With NBD alongside: both exports write the one disk, and the file does not cache.
        const sock = `${d.dir}/a.sock`;
        const disk = await d.attach(img, "--fuse", mp, "--nbd", `unix:${sock}`);
        assert.equal(disk.state, "running");
        assert.deepEqual(disk.exports, [`unix:${sock}`, `fuse:${mp}`]);
        assert.match(mountLine(mp) ?? "", / - fuse\.tapd tapd:/);
        assert.equal(Deno.statSync(mp).size, 16 * MiB);

        // Plain file I/O, unaligned.
        {
          using f = Deno.openSync(mp, { read: true, write: true });
          f.seekSync(MiB + 3, Deno.SeekMode.Start);
          assert.equal(f.writeSync(pattern(0x5a, 5000)), 5000);
          f.syncSync();
          const back = new Uint8Array(5000);
          f.seekSync(MiB + 3, Deno.SeekMode.Start);
          assert.equal(f.readSync(back), 5000);
          assert.deepEqual(back, pattern(0x5a, 5000));
        }
        // The image has it, and NBD sees it.
        const raw = Deno.readFileSync(img).subarray(MiB + 3, MiB + 5003);
        assert.deepEqual(raw, pattern(0x5a, 5000));
        await qemuIo(unixUri(disk), `read -P 0x5a ${MiB + 3} 5000`);
        // O_DIRECT both ways; an NBD write is seen through the file at once.
        const dd = await new Deno.Command("dd", {
          args: [`of=${mp}`, "bs=64k", "count=4", "seek=64", "oflag=direct", "conv=notrunc"],
          stdin: "piped",
          stderr: "piped",
        }).spawn();
        const w = dd.stdin.getWriter();
        await w.write(pattern(0xc3, 256 * 1024));
        await w.close();
        assert.equal((await dd.output()).code, 0);
        await qemuIo(unixUri(disk), "read -P 0xc3 4M 256k", "write -P 0x7e 8M 64k");
        const r = await new Deno.Command("dd", {
          args: [`if=${mp}`, "bs=64k", "count=1", "skip=128", "iflag=direct"],
          stdout: "piped",
          stderr: "null",
        }).output();
        assert.deepEqual(r.stdout, pattern(0x7e, 64 * 1024));

        // `ctl list` shows the export.
        const table = (await d.ctlOk("list")).stdout;
        assert.match(table, new RegExp(`\\n0\\s+running\\s.*unix:${sock},fuse:${mp}`));
        // The file is taken; a relative or missing path is refused before anything starts.
        const taken = await d.ctl("attach", img, "--fuse", mp);
        assert.equal(taken.code, 1);
        assert.equal(taken.stderr, `tapd: ctl: fuse:${mp} is already used by disk 0\n`);
        const missing = await d.request({ verb: "attach", spec: img, fuse: `${d.dir}/nope` });
        assert.ok(!missing.ok && /no such file \(create it first/.test(missing.error));
        const relative = await d.request({ verb: "attach", spec: img, fuse: "a.disk" });
        assert.ok(!relative.ok && /FUSE path "a.disk" is not absolute/.test(relative.error));

        // Busy: a process holds the file open. Detach is refused; the disk serves on.
        holder = new Deno.Command("sh", {
          args: ["-c", `exec 3<"${mp}"; echo held; exec sleep 60`],
          stdout: "piped",
          stderr: "null",
        }).spawn();
        await holder.stdout.getReader().read(); // "held"
        const refused = await d.ctl("detach", "0");
        assert.equal(refused.code, 1);
        assert.match(
          refused.stderr,
          /^tapd: ctl: detach disk 0: Cannot unmount .* the file is in use .*still served\)\n$/,
        );
        assert.equal((await d.list())[0].state, "running");
        assert.ok(isMounted(mp));
        await qemuIo(unixUri((await d.list())[0]), "read -P 0x7e 8M 64k");
        holder.kill("SIGKILL");
        await holder.status;
        holder = null;

        // Free: detach unmounts (also when paused), and the path is the plain file it was.
        await d.ctlOk("pause", "0");
        await d.ctlOk("detach", "0");
        assert.equal(mountLine(mp), undefined);
        const after = Deno.statSync(mp);
        assert.ok(after.isFile);
        assert.equal(after.size, 0);
        assert.equal(after.ino, before.ino);
        assert.deepEqual(await d.list(), []);
      } finally {
        if (holder !== null) {
          holder.kill("SIGKILL");
          await holder.status;
        }
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "daemon: a FUSE file unmounted from outside leaves the disk's exports, with the reason",
  ignore: skip !== null,
  async fn() {
    await withDaemon(async (d) => {
      const img = rawImage(d, "u.img", 16 * MiB);
      const mp = mountPointFile(`${d.dir}/u.disk`);
      try {
        const disk = await d.attach(`tap:aio:${img}`, "--fuse", mp);
        assert.deepEqual(disk.exports, [`fuse:${mp}`]);
        const u = await new Deno.Command("umount", { args: [mp], stderr: "piped" }).output();
        assert.equal(u.code, 0, new TextDecoder().decode(u.stderr));
        const listed = await waitForNoExports(d, 0);
        assert.deepEqual(listed.exports, []);
        assert.equal(listed.state, "running");
        assert.equal(listed.reason, `fuse:${mp} ended: unmounted from outside`);
        // The disk still holds its image: attaching it again is refused, and says why.
        const again = await d.ctl("attach", `tap:aio:${img}`, "--fuse", mp);
        assert.equal(
          again.stderr,
          `tapd: ctl: ${img} is written by disk 0, fuse:${mp} ended: unmounted from outside: ` +
            `a file that a disk writes cannot be shared (detach disk 0 first, or attach both ` +
            `read-only)\n`,
        );
        await d.ctlOk("detach", "0");
        const back = await d.attach(`tap:aio:${img}`, "--fuse", mp);
        await d.ctlOk("detach", String(back.id));
      } finally {
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "daemon: a FUSE I/O thread that fails mid-write ends the export, not the writer's wait; " +
    "list shows why",
  ignore: skip !== null,
  async fn() {
    const d = await TestDaemon.start(undefined, undefined, { TAPD_FAILPOINT: "fuse-thread" });
    const mp = mountPointFile(`${d.dir}/f.disk`);
    try {
      const img = rawImage(d, "f.img", 16 * MiB);
      await d.attach(`tap:aio:${img}`, "--fuse", mp, "--io-threads", "1");
      const w = await new Deno.Command("timeout", {
        args: [
          "20",
          "dd",
          "if=/dev/zero",
          `of=${mp}`,
          "bs=64k",
          "count=16",
          "oflag=direct",
          "conv=notrunc",
        ],
        stderr: "piped",
      }).output();
      assert.notEqual(w.code, 124, "the writer waited for a reply that never came");
      assert.notEqual(w.code, 0, "the write succeeded although its thread failed");
      const listed = await waitForNoExports(d, 0);
      assert.deepEqual(listed.exports, [], d.stderr);
      assert.match(listed.reason ?? "", /^fuse:.* ended: a FUSE I\/O thread failed: failpoint/);
      await d.ctlOk("detach", "0");
    } finally {
      await cleanupMount(mp);
      await d.dispose();
    }
  },
});

Deno.test({
  name:
    "daemon: SIGKILL of a tapdisk mid-write: failed, mount aborted, no D state, re-attach works",
  ignore: skip !== null,
  async fn() {
    await withDaemon(async (d) => {
      const img = rawImage(d, "b.img", 1024 * MiB);
      const mp = mountPointFile(`${d.dir}/b.disk`);
      let writer: Deno.ChildProcess | null = null;
      try {
        const disk = await d.attach(`tap:aio:${img}`, "--fuse", mp);
        assert.deepEqual(disk.exports, [`fuse:${mp}`]);
        assert.deepEqual(disk.uris, []);
        // Small direct writes over 1 GiB: still writing when the tapdisk dies.
        writer = new Deno.Command("dd", {
          args: ["if=/dev/zero", `of=${mp}`, "bs=4k", "oflag=direct", "conv=notrunc"],
          stdout: "null",
          stderr: "piped",
        }).spawn();
        const status = writer.output();
        let done = false;
        status.then(() => done = true);
        await sleep(300);
        assert.equal(done, false, "the writer finished before the tapdisk was killed");
        assert.ok(disk.pid !== null);
        Deno.kill(disk.pid, "SIGKILL");

        const failed = await waitForState(d, 0, "failed");
        assert.equal(failed.reason, "tapdisk killed by SIGKILL");
        assert.equal(failed.pid, null);
        assert.match(
          (await d.ctlOk("list")).stdout,
          /\n0\s+failed\s+-\s.*tapdisk killed by SIGKILL/,
        );
        // The writer got an error instead of hanging; the mount is gone; nobody is stuck.
        const out = await Promise.race([status, sleep(10_000).then(() => null)]);
        assert.ok(out !== null, "the writer is stuck");
        writer = null;
        assert.notEqual(out.code, 0);
        assert.doesNotMatch(new TextDecoder().decode(out.stderr), /No space left/);
        assert.equal(mountLine(mp), undefined, "a FUSE mount is left on the path");
        assert.ok(await eventually(() => stuckOnFuse().length === 0, 3000), stuckOnFuse().join());
        assert.equal(Deno.statSync(mp).size, 0);

        // The same path can be attached again at once (the failed disk keeps its id).
        const again = await d.attach(`tap:aio:${img}`, "--fuse", mp, "--io-threads", "1");
        assert.equal(again.id, 1);
        assert.match(mountLine(mp) ?? "", / - fuse\.tapd /);
        {
          using f = Deno.openSync(mp, { read: true, write: true });
          assert.equal(f.writeSync(pattern(0x11, 4096)), 4096);
          f.seekSync(0, Deno.SeekMode.Start);
          const back = new Uint8Array(4096);
          assert.equal(f.readSync(back), 4096);
          assert.deepEqual(back, pattern(0x11, 4096));
        }
        // Served by its I/O thread, and counted all the same.
        const stats = await d.request({ verb: "stats", id: 1 });
        assert.ok(stats.ok && stats.stats !== undefined, JSON.stringify(stats));
        const ops = stats.stats.ops;
        assert.ok(ops.write.requests >= 1 && ops.write.bytes >= 4096, JSON.stringify(ops.write));
        // SIGTERM to the daemon unmounts it too.
        await d.ctlOk("detach", "0");
        assert.equal((await d.stop()).code, 0, d.stderr);
        assert.equal(mountLine(mp), undefined);
        assert.match(d.stderr, /component=fuse .*msg=unmounted/);
      } finally {
        if (writer !== null) {
          try {
            writer.kill("SIGKILL");
          } catch { /* gone */ }
          await writer.status;
        }
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "daemon: attach --fuse --passthrough: data reaches the image, pause is refused, detach",
  ignore: skip !== null,
  async fn() {
    await withDaemon(async (d) => {
      const img = rawImage(d, "p.img", 16 * MiB);
      const mp = mountPointFile(`${d.dir}/p.disk`);
      try {
        const disk = await d.attach(img, "--fuse", mp, "--passthrough");
        assert.equal(disk.state, "running");
        assert.deepEqual(disk.exports, [`fuse:${mp}`]);
        {
          using f = Deno.openSync(mp, { read: true, write: true });
          f.seekSync(2 * MiB + 7, Deno.SeekMode.Start);
          assert.equal(f.writeSync(pattern(0x3c, 3000)), 3000);
          f.syncSync();
        }
        assert.deepEqual(
          Deno.readFileSync(img).subarray(2 * MiB + 7, 2 * MiB + 3007),
          pattern(0x3c, 3000),
        );
        const paused = await d.ctl("pause", "0");
        if (paused.code === 0) {
          // A kernel without FUSE passthrough: tapd serves the file itself, and can pause it.
          await d.ctlOk("resume", "0");
        } else {
          assert.equal(paused.code, 1);
          assert.match(
            paused.stderr,
            /^tapd: ctl: .*cannot pause: the kernel writes this disk's image directly \(FUSE passthrough\); attach it without --passthrough to pause it\n$/,
          );
          assert.equal((await d.list())[0].state, "running");
        }
        const usage = await d.ctl("attach", img, "--passthrough");
        assert.equal(usage.code, 2);
        assert.match(usage.stderr, /--passthrough is an option of --fuse PATH/);
        const bare = await d.request({ verb: "attach", spec: img, passthrough: true });
        assert.ok(!bare.ok && /"passthrough" is an option of a "fuse" export/.test(bare.error));
        const both = await d.ctl("attach", img, "--fuse", mp, "--passthrough", "--fuse-uring");
        assert.equal(both.code, 2);
        assert.match(
          both.stderr,
          /--passthrough and --fuse-uring both choose who serves reads and writes: give one/,
        );
        const bareBoth = await d.request({
          verb: "attach",
          spec: img,
          fuse: mp,
          passthrough: true,
          ioThreads: 2,
        });
        assert.ok(!bareBoth.ok && /"passthrough" and "ioThreads"/.test(bareBoth.error));
        const threads = await d.ctl("attach", img, "--io-threads", "2");
        assert.equal(threads.code, 2);
        assert.match(threads.stderr, /--io-threads is an option of --fuse/);
        const many = await d.ctl("attach", img, "--fuse", mp, "--io-threads", "65");
        assert.equal(many.code, 2);
        assert.match(
          many.stderr,
          /Invalid --io-threads "65": expected a whole number from 0 to 64/,
        );
        const bareThreads = await d.request({ verb: "attach", spec: img, ioThreads: 2 });
        assert.ok(
          !bareThreads.ok && /"ioThreads" is an option of a "fuse" export/.test(bareThreads.error),
        );
        await d.ctlOk("detach", "0");
        assert.equal(mountLine(mp), undefined);
        assert.deepEqual(await d.list(), []);
      } finally {
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test({
  name: "daemon: attach --fuse --fuse-uring: O_DIRECT I/O through the file, over io_uring",
  ignore: noUring !== null,
  async fn() {
    await withDaemon(async (d) => {
      const img = rawImage(d, "u.img", 16 * MiB);
      const mp = mountPointFile(`${d.dir}/u.disk`);
      try {
        const disk = await d.attach(`tap:aio:${img}`, "--fuse", mp, "--fuse-uring");
        assert.equal(disk.state, "running");
        assert.deepEqual(disk.exports, [`fuse:${mp}`]);
        // The tapdisk's log (the daemon's stderr): mounted with the ring in use.
        assert.ok(
          await eventually(() => /component=fuse .*uring=true msg=mounted/.test(d.stderr), 3000),
          d.stderr,
        );
        assert.doesNotMatch(d.stderr, /no FUSE over io_uring/);
        const w = await new Deno.Command("dd", {
          args: [`of=${mp}`, "bs=64k", "count=4", "seek=16", "oflag=direct", "conv=notrunc"],
          stdin: "piped",
          stderr: "piped",
        }).spawn();
        const writer = w.stdin.getWriter();
        await writer.write(pattern(0xa5, 256 * 1024));
        await writer.close();
        assert.equal((await w.output()).code, 0);
        const r = await new Deno.Command("dd", {
          args: [`if=${mp}`, "bs=64k", "count=4", "skip=16", "iflag=direct"],
          stdout: "piped",
          stderr: "null",
        }).output();
        assert.deepEqual(r.stdout, pattern(0xa5, 256 * 1024));
        assert.deepEqual(
          Deno.readFileSync(img).subarray(MiB, 1280 * 1024),
          pattern(0xa5, 256 * 1024),
        );
        await d.ctlOk("detach", "0");
        assert.equal(mountLine(mp), undefined);
      } finally {
        await cleanupMount(mp);
      }
    });
  },
});

Deno.test("daemon: --fuse-uring without --fuse is a usage error (ctl attach, tapdisk, request)", async () => {
  await withDaemon(async (d) => {
    const img = rawImage(d, "n.img", MiB);
    const ctl = await d.ctl("attach", img, "--fuse-uring");
    assert.equal(ctl.code, 2);
    assert.equal(ctl.stderr, "tapd: ctl: attach: --fuse-uring is an option of --fuse\n");
    const list = await d.ctl("list", "--fuse-uring");
    assert.equal(list.code, 2);
    assert.equal(list.stderr, "tapd: ctl: list takes no --fuse-uring\n");
    const tapdisk = await tapd("tapdisk", img, "--nbd", `unix:${d.dir}/n.sock`, "--fuse-uring");
    assert.equal(tapdisk.code, 2);
    assert.equal(tapdisk.stderr, "tapd: tapdisk: --fuse-uring is an option of --fuse\n");
    const bare = await d.request({ verb: "attach", spec: img, uring: true });
    assert.ok(!bare.ok && bare.error === `attach: "uring" is an option of a "fuse" export`);
    const typed = await d.request({ verb: "attach", spec: img, fuse: "/x", uring: "yes" });
    assert.ok(!typed.ok && typed.error === `attach: "uring" must be a boolean`);
    assert.deepEqual(await d.list(), []);
  });
});
