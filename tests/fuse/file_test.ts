/**
 * The FUSE file as a file: size and type, buffered and O_DIRECT I/O at aligned and unaligned
 * offsets (checked against the image itself), fsync, truncate refused, fallocate (punch hole,
 * zero range, preallocation, growth refused), SEEK_DATA/SEEK_HOLE, statfs, a read-only export,
 * and the one-line errors of `tapd serve --fuse` for bad mount points.
 */
import assert from "node:assert/strict";
import { FileHandle } from "../../ffi/file.ts";
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  O_RDONLY,
  O_RDWR,
  SEEK_DATA,
  SEEK_HOLE,
} from "../../ffi/constants.ts";
import { assertBytes, cpuTicks, rng, withTempDir } from "../util.ts";
import {
  cleanupMount,
  FuseServe,
  fuseUnavailable,
  MiB,
  mountPointFile,
  pread,
  pwrite,
  rawImage,
  ROOT,
  run,
  runOk,
  withFuse,
} from "./helpers.ts";

const SIZE = 32 * MiB;
const skip = fuseUnavailable();

async function throwsMatching(
  fn: () => unknown | Promise<unknown>,
  pattern: RegExp,
): Promise<void> {
  try {
    await fn();
  } catch (e) {
    assert.match((e as Error).message, pattern);
    return;
  }
  assert.fail(`expected an error matching ${pattern}`);
}

Deno.test({
  name: "FUSE file: reads and writes at any offset reach the image, O_DIRECT too",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      Deno.chmodSync(mp, 0o640);
      await withFuse(img, mp, async () => {
        const st = Deno.statSync(mp);
        assert.ok(st.isFile);
        assert.equal(st.size, SIZE);
        assert.equal((st.mode ?? 0) & 0o777, 0o640, "permissions come from the mount point");
        const r = rng(7);
        // Unaligned buffered writes (read-modify-write inside tapd) and aligned ones.
        const pieces: [number, Uint8Array][] = [
          [0, r.fill(new Uint8Array(6))],
          [511, r.fill(new Uint8Array(3))],
          [4096 * 3 + 17, r.fill(new Uint8Array(10_000))],
          [MiB, r.fill(new Uint8Array(2 * MiB))],
          [SIZE - 700, r.fill(new Uint8Array(700))],
        ];
        for (const [off, data] of pieces) pwrite(mp, off, data);
        for (const [off, data] of pieces) {
          assertBytes(pread(mp, off, data.length), data, `mount @${off}`);
          assertBytes(pread(img, off, data.length), data, `image @${off}`);
        }
        // Past the end: reads are short, writes fail with ENOSPC.
        assert.equal(pread(mp, SIZE - 10, 100).length, 10);
        await throwsMatching(() => pwrite(mp, SIZE - 10, new Uint8Array(100)), /No space left/);
        // O_DIRECT both ways, through dd.
        const src = `${dir}/src`;
        Deno.writeFileSync(src, r.fill(new Uint8Array(4 * MiB)));
        await runOk("dd", [
          `if=${src}`,
          `of=${mp}`,
          "bs=1M",
          "seek=8",
          "oflag=direct",
          "conv=notrunc,fsync",
        ]);
        await runOk("dd", [
          `if=${mp}`,
          `of=${dir}/back`,
          "bs=1M",
          "skip=8",
          "count=4",
          "iflag=direct",
        ]);
        assertBytes(
          Deno.readFileSync(`${dir}/back`),
          Deno.readFileSync(src),
          "O_DIRECT round trip",
        );
        assertBytes(pread(img, 8 * MiB, 4 * MiB), Deno.readFileSync(src), "image after O_DIRECT");
        // fsync reaches the disk's flush.
        const f = Deno.openSync(mp, { read: true, write: true });
        f.syncSync();
        f.syncDataSync();
        f.close();
      });
    });
  },
});

/** A raw image of SIZE bytes in a temporary directory, served on a FUSE file there. */
function withServedRaw(
  fn: (dir: string, file: string, serve: FuseServe) => Promise<unknown>,
  extra: string[] = [],
): Promise<void> {
  return withTempDir(async (dir) => {
    const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
    rawImage(img, SIZE);
    await withFuse(img, mp, (serve) => fn(dir, mp, serve), { extra });
  });
}

/** fio's random O_DIRECT writes at depth 32 on `file`, then every block verified. */
function fioVerify(dir: string, file: string, sizes: string[]): Promise<unknown> {
  return runOk("fio", [
    "--name=verify",
    `--filename=${file}`,
    "--ioengine=libaio",
    "--direct=1",
    "--rw=randwrite",
    "--iodepth=32",
    ...sizes,
    "--verify=crc32c",
    "--do_verify=1",
    "--verify_fatal=1",
  ], { cwd: dir }); // (fio keeps its verify state file in its working directory)
}

Deno.test({
  name: "FUSE file, tapd serve --poll-us 200: fio's verified random O_DIRECT I/O, then idle",
  ignore: skip !== null,
  fn: () =>
    withServedRaw(async (dir, mp, serve) => {
      await fioVerify(dir, mp, ["--bs=4k", `--size=${16 * MiB}`]);
      // Polling stops 200 µs after the last request: an idle second costs next to no CPU.
      await new Promise((r) => setTimeout(r, 200));
      const before = cpuTicks(serve.pid);
      await new Promise((r) => setTimeout(r, 1000));
      const used = cpuTicks(serve.pid) - before;
      assert.ok(used < 10, `an idle tapd serve --poll-us 200 used ${used} ticks in 1 s`);
    }, ["--poll-us", "200"]),
});

Deno.test({
  name: "FUSE file: fio's verified O_DIRECT writes of 64 KiB–1 MiB, 32 in flight (bursts read " +
    "from /dev/fuse in parts, each submitted before the next is read)",
  ignore: skip !== null,
  fn: () => withServedRaw((dir, mp) => fioVerify(dir, mp, ["--bsrange=64k-1m", `--size=${SIZE}`])),
});

Deno.test({
  name: "FUSE file: size changes are refused, fallocate punches and zeroes, SEEK_DATA/HOLE",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      await withFuse(img, mp, async () => {
        await throwsMatching(() => Deno.truncateSync(mp, MiB), /not permitted/);
        const t = await run("truncate", ["-s", "1M", mp]);
        assert.notEqual(t.code, 0);
        assert.match(t.stderr, /Operation not permitted/);
        Deno.truncateSync(mp, SIZE); // the same size is fine
        assert.equal(Deno.statSync(mp).size, SIZE);

        const ones = new Uint8Array(4 * MiB).fill(0x5a);
        pwrite(mp, 4 * MiB, ones);
        using file = FileHandle.open(mp, O_RDWR);
        // SEEK_DATA / SEEK_HOLE follow the image's allocation.
        assert.equal(await file.seek(0, SEEK_DATA), 4 * MiB);
        assert.equal(await file.seek(4 * MiB + 5, SEEK_DATA), 4 * MiB + 5);
        assert.equal(await file.seek(4 * MiB, SEEK_HOLE), 8 * MiB);
        assert.equal(await file.seek(0, SEEK_HOLE), 0);
        await assert.rejects(file.seek(9 * MiB, SEEK_DATA), /ENXIO/);
        await assert.rejects(file.seek(SIZE, SEEK_HOLE), /ENXIO/);
        // Punch a hole (aligned, with unaligned edges): zeros, and a hole in the image.
        await file.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 5 * MiB - 100, MiB + 200);
        assertBytes(pread(mp, 5 * MiB - 100, MiB + 200), new Uint8Array(MiB + 200), "punched");
        assert.equal(pread(mp, 5 * MiB - 101, 1)[0], 0x5a);
        assert.equal(pread(mp, 6 * MiB + 100, 1)[0], 0x5a);
        using image = FileHandle.open(img, O_RDONLY);
        assert.equal(await image.seek(5 * MiB, SEEK_HOLE), 5 * MiB, "the image has a hole");
        // Zero a range keeping it allocated.
        await file.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 7 * MiB + 3, 4096);
        assertBytes(pread(mp, 7 * MiB + 3, 4096), new Uint8Array(4096), "zeroed");
        assert.equal(pread(mp, 7 * MiB + 2, 1)[0], 0x5a);
        // Preallocation inside the disk is a no-op; growing it is refused.
        await file.fallocate(0, 0, MiB);
        await assert.rejects(file.fallocate(0, SIZE - 4096, 8192), /ENOSPC/);
        assert.equal(Deno.statSync(mp).size, SIZE);
        // statfs: blocks of 4 KiB covering the disk.
        const df = await runOk("stat", ["-f", "-c", "%S %b", mp]);
        assert.equal(df.stdout.trim(), `4096 ${SIZE / 4096}`);
      });
    });
  },
});

Deno.test({
  name: "FUSE file: a read-only export refuses writes",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      pwrite(img, 0, new Uint8Array(4096).fill(7));
      await withFuse(img, mp, async () => {
        assert.equal(pread(mp, 0, 1)[0], 7);
        assert.equal((Deno.statSync(mp).mode ?? 0) & 0o222, 0, "no write bits");
        await throwsMatching(() => Deno.openSync(mp, { write: true }), /Read-only file system/);
        const dd = await run("dd", [
          "if=/dev/zero",
          `of=${mp}`,
          "bs=4k",
          "count=1",
          "conv=notrunc",
        ]);
        assert.notEqual(dd.code, 0);
        assert.match(dd.stderr, /Read-only file system|Operation not permitted/);
        assert.equal(pread(img, 0, 1)[0], 7);
      }, { readOnly: true });
    });
  },
});

Deno.test({
  name: "tapd serve --fuse: one-line errors for a missing, wrong or already used mount point",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`;
      rawImage(img, SIZE);
      const tapd = (...args: string[]) => run(`${ROOT}tapd`, ["serve", img, ...args]);
      let r = await tapd("--fuse", `${dir}/missing`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /^tapd: Cannot mount on ".*missing": no such file/m);
      Deno.mkdirSync(`${dir}/adir`);
      r = await tapd("--fuse", `${dir}/adir`);
      assert.equal(r.code, 1);
      assert.match(r.stderr, /not a regular file/);
      r = await tapd();
      assert.equal(r.code, 2);
      assert.match(r.stderr, /give an export: --nbd ADDR and\/or --fuse PATH/);
      const mp = mountPointFile(`${dir}/disk`);
      const serve = await FuseServe.start(img, mp);
      try {
        // The image itself is written by the first serve (its lock): only a shared reader gets
        // as far as the mount point.
        r = await tapd("--fuse", mp);
        assert.equal(r.code, 1);
        assert.match(r.stderr, /for writing: another process writes it/);
        r = await tapd("--fuse", mp, "--read-only", "--force-share");
        assert.equal(r.code, 1);
        assert.match(r.stderr, /already a mount point \(fuse\.tapd/);
      } finally {
        await serve.stop();
        await cleanupMount(mp);
      }
      assert.equal(Deno.statSync(mp).size, 0, "the mount point is itself again");
    });
  },
});

Deno.test({
  name: "tapd serve --fuse: unmounting the file from outside ends a FUSE-only serve",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`);
      rawImage(img, SIZE);
      const serve = await FuseServe.start(img, mp);
      await runOk("umount", [mp]);
      const status = await serve.wait(15_000);
      assert.equal(status.code, 0, serve.stderr);
    });
  },
});

Deno.test({
  name: "tapd serve --fuse with --nbd: writes through either export are seen by the other",
  ignore: skip !== null,
  async fn() {
    await withTempDir(async (dir) => {
      const img = `${dir}/disk.img`, mp = mountPointFile(`${dir}/disk`), sock = `${dir}/nbd.sock`;
      rawImage(img, SIZE);
      const serve = await FuseServe.start(img, mp, { extra: ["--nbd", `unix:${sock}`] });
      try {
        const uri = `nbd+unix:///?socket=${sock}`;
        const f = Deno.openSync(mp, { read: true, write: true });
        try {
          const buf = new Uint8Array(4096);
          f.readSync(buf);
          assert.equal(buf[0], 0);
          // Written through NBD while the file is open: the same descriptor sees it (no cache).
          await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x33 0 4k", uri]);
          f.seekSync(0, Deno.SeekMode.Start);
          f.readSync(buf);
          assertBytes(buf, new Uint8Array(4096).fill(0x33), "after an NBD write");
          // Written through the file: NBD reads it.
          f.seekSync(8192, Deno.SeekMode.Start);
          f.writeSync(new Uint8Array(4096).fill(0x44));
        } finally {
          f.close();
        }
        await runOk("qemu-io", ["-f", "raw", "-c", "read -P 0x44 8k 4k", uri]);
      } finally {
        await serve.stop();
        await cleanupMount(mp);
      }
    });
  },
});
